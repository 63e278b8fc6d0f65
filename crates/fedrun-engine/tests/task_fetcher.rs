//! Guarantees of the `TaskFetcher` actor (task pulls and result pushes),
//! checked against a fake server job: a plain cell at `server.J` whose
//! handlers on `server_command` / `get_task` and `submit_update` answer as the pinned protocol
//! says (a scripted reply per request) and record every request they receive.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{Actor, Addr};
use fedrun_cell::{request_handler, Cell, CellMessage, Fqcn, HandlerError, Network, Payload};
use fedrun_core::constants::{channel, header_key, task_header, topic};
use fedrun_core::peer_context::MASK_PRIVATE;
use fedrun_core::{AppReturnCode, ContextProp, Map, PeerContext, Shareable, Value};
use fedrun_engine::{
    AbortRun, ClientEngine, EngineError, EngineHandle, FetcherState, GetFetcherState, GetRunInfo,
    GetTaskAssignment, NewContext, RunInfo, RunInfoConfig, SendTaskResult, TaskFetcher,
    TaskFetcherConfig,
};
use tokio::sync::mpsc;

const JOB: &str = "J";
const SITE: &str = "site-1";
/// The deadline of every wait in these tests.
const DEADLINE: Duration = Duration::from_secs(5);
/// The timeout of pulls and pushes that are expected to be answered.
const ANSWERED: Duration = Duration::from_secs(5);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("no answer before the deadline")
}

/// What the fake server answers to one request.
enum Reply {
    /// Cell `ok` with this Shareable.
    Ok(Shareable),
    /// Cell `ok` with a payload that is not a Shareable.
    NotShareable,
    /// A failure with this cell code.
    Fail(HandlerError),
    /// No reply at all (the client's request times out).
    Silent,
}

/// One request the fake server received.
struct Received {
    topic: String,
    message: CellMessage,
}

impl Received {
    fn payload(&self) -> &Shareable {
        self.message
            .payload
            .as_shareable()
            .expect("the request payload is a Shareable")
    }

    fn header(&self, key: &str) -> Option<&Value> {
        self.payload().header_or_none(key)
    }

    fn peer_ctx(&self) -> &PeerContext {
        self.payload()
            .peer_context()
            .expect("the request carries __peer_ctx__")
    }
}

type Script = Arc<Mutex<VecDeque<Reply>>>;

/// The fake server job `server.J`.
struct FakeServer {
    get_task: Script,
    submit: Script,
    received: mpsc::UnboundedReceiver<Received>,
}

impl FakeServer {
    async fn start(net: &Network) -> FakeServer {
        let cell = Cell::start(Fqcn::job_cell("server", JOB).unwrap(), net.clone()).unwrap();
        let (tx, received) = mpsc::unbounded_channel();
        let get_task: Script = Arc::default();
        let submit: Script = Arc::default();
        for (name, script) in [
            (topic::GET_TASK, &get_task),
            (topic::SUBMIT_UPDATE, &submit),
        ] {
            let script = Arc::clone(script);
            let tx = tx.clone();
            let handler = request_handler(move |message: CellMessage| {
                let reply = script.lock().unwrap().pop_front();
                let topic = message.headers.topic().unwrap_or_default().to_owned();
                let _ = tx.send(Received {
                    topic: topic.clone(),
                    message,
                });
                async move {
                    let reply = reply.unwrap_or_else(|| {
                        // Unscripted: the protocol's "nothing to do" answers.
                        if topic == topic::GET_TASK {
                            Reply::Ok(try_again(1.0, None))
                        } else {
                            Reply::Ok(Shareable::new())
                        }
                    });
                    match reply {
                        Reply::Ok(s) => Ok(Some(CellMessage::new(s))),
                        Reply::NotShareable => Ok(Some(CellMessage::new(Payload::value(7)))),
                        Reply::Fail(e) => Err(e),
                        Reply::Silent => Ok(None),
                    }
                }
            });
            cell.register_request_handler(channel::SERVER_COMMAND, name, handler)
                .await
                .unwrap();
        }
        FakeServer {
            get_task,
            submit,
            received,
        }
    }

    fn on_get_task(&self, reply: Reply) {
        self.get_task.lock().unwrap().push_back(reply);
    }

    fn on_submit(&self, reply: Reply) {
        self.submit.lock().unwrap().push_back(reply);
    }

    /// The next request received, which must be on `topic`.
    async fn next(&mut self, topic: &str) -> Received {
        let r = within(self.received.recv())
            .await
            .expect("the fake server is gone");
        assert_eq!(r.topic, topic);
        r
    }
}

/// The server job's context, as it sends it with every task.
fn server_ctx() -> PeerContext {
    let mut ctx = PeerContext::default();
    ctx.set("__run_num__", JOB);
    ctx.set("__identity_name__", "server");
    ctx.props.push((
        "server_secret".to_owned(),
        ContextProp {
            value: Value::from("s3"),
            mask: MASK_PRIVATE,
        },
    ));
    ctx
}

/// A real task as the captured server sends one.
fn real_task(name: &str, id: &str) -> Shareable {
    let mut dxo = Map::new();
    dxo.insert("kind", "WEIGHTS");
    dxo.insert("data", Map::from_iter([("w", 1.5)]));
    dxo.insert("meta", Map::new());
    let mut task = Shareable::new();
    task.insert("DXO", dxo);
    task.set_header(header_key::CONTENT_TYPE, "DXO");
    task.set_header("current_round", 0);
    task.set_header("num_rounds", 2);
    task.set_cookie_jar(Map::from_iter([
        ("contribution_round", Value::from(0)),
        ("__workflow__", Value::from("scatter_and_gather")),
        ("__task_id__", Value::from(id)),
    ]));
    task.set_header(header_key::TASK_NAME, name);
    task.set_header(header_key::TASK_OPERATOR, Map::new());
    task.set_header(header_key::TASK_ID, id);
    task.set_header(header_key::MSG_ROOT_ID, format!("root-{id}"));
    task.set_header(header_key::MSG_ROOT_TTL, 3600.0);
    task.set_header(header_key::WAIT_TIME, 2.0);
    task.set_header(task_header::TASK_NAME, name);
    task.set_peer_context(server_ctx());
    task
}

fn try_again(wait: f64, min_get_task_timeout: Option<Value>) -> Shareable {
    let mut s = Shareable::new();
    s.set_header(task_header::TASK_NAME, "__try_again__");
    s.set_header(header_key::WAIT_TIME, wait);
    if let Some(t) = min_get_task_timeout {
        s.set_header(task_header::MIN_GET_TASK_TIMEOUT, t);
    }
    s.set_peer_context(server_ctx());
    s
}

fn end_run() -> Shareable {
    let mut s = Shareable::new();
    s.set_header(task_header::TASK_NAME, "__end_run__");
    s.set_header(header_key::TASK_ID, "");
    s.set_cookie_jar(Map::from_iter([("__task_id__", "")]));
    s.set_peer_context(server_ctx());
    s
}

/// A client job's run, cell and task fetcher (communication timeout `comm`).
struct Client {
    run: Addr<RunInfo>,
    cell: fedrun_cell::CellHandle,
    fetcher: Addr<TaskFetcher>,
}

fn client(net: &Network, comm: Duration) -> Client {
    let run = RunInfo::new(RunInfoConfig::new(SITE, JOB)).start();
    let cell = Cell::start(Fqcn::job_cell(SITE, JOB).unwrap(), net.clone()).unwrap();
    let config = TaskFetcherConfig::new(SITE, JOB, cell.clone(), run.clone())
        .with_communication_timeout(comm);
    let fetcher = TaskFetcher::new(config).unwrap().start();
    Client { run, cell, fetcher }
}

impl Client {
    async fn pull(&self, timeout: Option<Duration>) -> Option<fedrun_core::TaskAssignment> {
        within(self.fetcher.send(GetTaskAssignment { ctx: None, timeout }))
            .await
            .unwrap()
            .unwrap()
            .task
    }

    async fn push(&self, msg: SendTaskResult) -> bool {
        within(self.fetcher.send(msg)).await.unwrap().unwrap()
    }

    async fn state(&self) -> FetcherState {
        within(self.fetcher.send(GetFetcherState)).await.unwrap()
    }

    async fn current_task(&self) -> String {
        within(self.run.send(GetRunInfo))
            .await
            .unwrap()
            .current_task_name
    }
}

fn result_of(task_name: &str, task_id: &str) -> Shareable {
    let mut r = Shareable::new();
    r.set_return_code(AppReturnCode::Ok);
    r.set_header(header_key::TASK_NAME, task_name);
    r.set_header(header_key::TASK_ID, task_id);
    r.set_cookie_jar(Map::from_iter([("__task_id__", task_id)]));
    r.set_header(header_key::MSG_ROOT_ID, "result-root");
    r.insert("DXO", Map::from_iter([("kind", "WEIGHT_DIFF")]));
    r
}

#[actix::test]
async fn real_task_round_trip_carries_peer_ctx_project_name_and_last_task_id() {
    let net = Network::new();
    let mut server = FakeServer::start(&net).await;
    let c = client(&net, Duration::from_secs(300));

    server.on_get_task(Reply::Ok(real_task("train", "t-1")));
    let task = c.pull(Some(ANSWERED)).await.expect("a successful pull");
    let req = server.next(topic::GET_TASK).await;
    // The request: the client's public props as a peer context, the project name cell header,
    // no last_task_id yet, sent optional.
    let peer = req.peer_ctx();
    assert_eq!(peer.get("__run_num__").and_then(Value::as_str), Some(JOB));
    assert_eq!(
        peer.get("__identity_name__").and_then(Value::as_str),
        Some(SITE)
    );
    assert_eq!(peer.get("__fqsn__").and_then(Value::as_str), Some(SITE));
    assert_eq!(peer.get("__is_leaf__").and_then(Value::as_bool), Some(true));
    assert!(
        peer.get("__process_type__").is_none(),
        "private props stay home"
    );
    assert_eq!(
        req.message
            .headers
            .get(task_header::PROJECT_NAME)
            .and_then(Value::as_str),
        Some("fedrun")
    );
    assert!(req.header(task_header::LAST_TASK_ID).is_none());
    assert_eq!(req.message.headers.optional(), Some(true));

    // The assignment: name, id, the task data as sent plus the server's public props.
    assert_eq!(task.name, "train");
    assert_eq!(task.task_id.as_deref(), Some("t-1"));
    assert!(!task.is_try_again() && !task.is_end_run());
    assert_eq!(task.data.get("DXO"), real_task("train", "t-1").get("DXO"));
    assert_eq!(
        task.data.cookie("__task_id__").and_then(Value::as_str),
        Some("t-1")
    );
    assert_eq!(
        task.data
            .peer_prop("__identity_name__")
            .and_then(Value::as_str),
        Some("server")
    );
    assert!(task.data.peer_prop("server_secret").is_none());
    assert_eq!(task.data.peer_context(), Some(&server_ctx()));
    assert_eq!(c.current_task().await, "train");
    assert_eq!(
        c.state().await,
        FetcherState {
            last_task_id: Some("t-1".into()),
            pending_task_id: Some("t-1".into()),
            communication_timeout: Duration::from_secs(300),
        }
    );

    // The second pull names the task received last.
    server.on_get_task(Reply::Ok(try_again(1.0, None)));
    let again = c.pull(Some(ANSWERED)).await.expect("a successful pull");
    assert!(again.is_try_again());
    let req = server.next(topic::GET_TASK).await;
    assert_eq!(
        req.header(task_header::LAST_TASK_ID)
            .and_then(Value::as_str),
        Some("t-1")
    );
    assert_eq!(c.state().await.last_task_id.as_deref(), Some("t-1"));

    // The result goes back with its task name, the client's peer ctx and the msg root id.
    let pushed = c
        .push(SendTaskResult::new(result_of("train", "t-1")).with_timeout(ANSWERED))
        .await;
    assert!(pushed);
    let req = server.next(topic::SUBMIT_UPDATE).await;
    assert_eq!(
        req.header(header_key::TASK_NAME).and_then(Value::as_str),
        Some("train")
    );
    assert_eq!(
        req.peer_ctx()
            .get("__identity_name__")
            .and_then(Value::as_str),
        Some(SITE)
    );
    assert_eq!(
        req.payload().cookie("__task_id__").and_then(Value::as_str),
        Some("t-1")
    );
    assert_eq!(req.message.headers.msg_root_id(), Some("result-root"));
    assert_eq!(req.message.headers.optional(), Some(false));
    assert_eq!(
        req.message
            .headers
            .get(task_header::PROJECT_NAME)
            .and_then(Value::as_str),
        Some("fedrun")
    );
    assert_eq!(c.current_task().await, "");
    assert_eq!(c.state().await.pending_task_id, None);
    assert_eq!(c.state().await.last_task_id.as_deref(), Some("t-1"));
}

#[actix::test]
async fn min_get_task_timeout_raises_the_communication_timeout_and_never_lowers_it() {
    let net = Network::new();
    let mut server = FakeServer::start(&net).await;
    let comm = Duration::from_millis(200);
    let c = client(&net, comm);

    // A number raises it.
    server.on_get_task(Reply::Ok(try_again(0.5, Some(Value::from(0.6)))));
    assert!(c.pull(None).await.unwrap().is_try_again());
    assert_eq!(
        c.state().await.communication_timeout,
        Duration::from_millis(600)
    );
    // Smaller values (number or numeric string) and junk never lower it.
    for smaller in [Value::from(0.3), Value::from("0.1"), Value::from("soon")] {
        server.on_get_task(Reply::Ok(try_again(0.5, Some(smaller))));
        assert!(c.pull(None).await.unwrap().is_try_again());
        assert_eq!(
            c.state().await.communication_timeout,
            Duration::from_millis(600)
        );
    }
    // A numeric string raises it too.
    server.on_get_task(Reply::Ok(try_again(0.5, Some(Value::from(" 0.8 ")))));
    assert!(c.pull(None).await.unwrap().is_try_again());
    assert_eq!(
        c.state().await.communication_timeout,
        Duration::from_millis(800)
    );
    for _ in 0..5 {
        server.next(topic::GET_TASK).await;
    }

    // The raised timeout is the one the cell request waits: a silent server fails the pull
    // no earlier than 800 ms (it was 200 ms at start).
    server.on_get_task(Reply::Silent);
    let started = Instant::now();
    assert!(c.pull(None).await.is_none());
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(800), "waited {waited:?}");
}

#[actix::test]
async fn pull_waits_the_larger_of_its_argument_and_the_communication_timeout() {
    let net = Network::new();
    let _server = {
        let s = FakeServer::start(&net).await;
        s.on_get_task(Reply::Silent);
        s.on_get_task(Reply::Silent);
        s
    };
    let c = client(&net, Duration::from_millis(300));

    let started = Instant::now();
    assert!(c.pull(Some(Duration::from_millis(20))).await.is_none());
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300), "waited {waited:?}");

    let started = Instant::now();
    assert!(c.pull(Some(Duration::from_millis(700))).await.is_none());
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(700), "waited {waited:?}");
}

#[actix::test]
async fn end_run_comes_back_as_an_assignment_and_is_not_remembered() {
    let net = Network::new();
    let server = FakeServer::start(&net).await;
    let c = client(&net, Duration::from_secs(300));

    server.on_get_task(Reply::Ok(end_run()));
    let task = c.pull(Some(ANSWERED)).await.expect("a successful pull");
    assert!(task.is_end_run());
    assert_eq!(task.name, "__end_run__");
    assert_eq!(task.task_id.as_deref(), Some(""));
    let state = c.state().await;
    assert_eq!(state.last_task_id, None);
    assert_eq!(state.pending_task_id, None);
    assert_eq!(c.current_task().await, "");
}

#[actix::test]
async fn reply_without_peer_ctx_is_a_failed_pull_and_the_fetcher_carries_on() {
    let net = Network::new();
    let server = FakeServer::start(&net).await;
    let c = client(&net, Duration::from_secs(300));

    let mut no_ctx = real_task("train", "t-9");
    no_ctx.remove_header(header_key::PEER_CTX);
    server.on_get_task(Reply::Ok(no_ctx));
    assert!(c.pull(Some(ANSWERED)).await.is_none());
    // The rejected task is not recorded, and the fetcher still works.
    assert_eq!(c.state().await.last_task_id, None);
    assert_eq!(c.current_task().await, "");
    server.on_get_task(Reply::Ok(real_task("train", "t-10")));
    let task = c.pull(Some(ANSWERED)).await.expect("a successful pull");
    assert_eq!(task.task_id.as_deref(), Some("t-10"));
}

#[actix::test]
async fn reply_that_is_not_a_shareable_is_a_failed_pull() {
    let net = Network::new();
    let server = FakeServer::start(&net).await;
    let c = client(&net, Duration::from_secs(300));

    server.on_get_task(Reply::NotShareable);
    assert!(c.pull(Some(ANSWERED)).await.is_none());
    // A reply without a task name is no assignment either.
    let mut nameless = real_task("train", "t-1");
    nameless.remove_header(task_header::TASK_NAME);
    nameless.remove_header(header_key::TASK_NAME);
    server.on_get_task(Reply::Ok(nameless));
    assert!(c.pull(Some(ANSWERED)).await.is_none());
    assert_eq!(c.state().await.last_task_id, None);
}

#[actix::test]
async fn unreachable_server_and_failure_codes_are_failed_pulls() {
    let net = Network::new();
    let c = client(&net, Duration::from_secs(300));
    // No server job on the network at all.
    assert!(c.pull(Some(ANSWERED)).await.is_none());

    let server = FakeServer::start(&net).await;
    server.on_get_task(Reply::Fail(HandlerError::Other("boom".into())));
    server.on_get_task(Reply::Fail(HandlerError::AuthenticationError));
    server.on_get_task(Reply::Fail(HandlerError::ServiceUnavailable));
    for _ in 0..3 {
        assert!(c.pull(Some(ANSWERED)).await.is_none());
    }
    // The server is now scripted to say "try again": the pull succeeds.
    assert!(c.pull(Some(ANSWERED)).await.unwrap().is_try_again());
}

#[actix::test]
async fn submit_update_is_true_only_for_cell_ok() {
    let net = Network::new();
    let server = FakeServer::start(&net).await;
    // A long communication timeout: a push with a timeout argument must not wait for it
    // (push timeout = argument, no max).
    let c = client(&net, Duration::from_secs(300));

    server.on_submit(Reply::Ok(Shareable::new()));
    server.on_submit(Reply::Fail(HandlerError::Other("boom".into())));
    server.on_submit(Reply::Fail(HandlerError::InvalidSession));
    server.on_submit(Reply::Silent);
    let push = || SendTaskResult::new(result_of("train", "t-1"));
    assert!(c.push(push().with_timeout(ANSWERED)).await);
    assert!(!c.push(push().with_timeout(ANSWERED)).await);
    assert!(!c.push(push().with_timeout(ANSWERED)).await);
    let started = Instant::now();
    assert!(
        !c.push(push().with_timeout(Duration::from_millis(200)))
            .await
    );
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(200), "waited {waited:?}");
    // An unreachable server (a network without one) is false too.
    let stranger = client(&Network::new(), Duration::from_secs(300));
    assert!(!stranger.push(push().with_timeout(ANSWERED)).await);
}

#[actix::test]
async fn task_aborted_result_is_sent_optional() {
    let net = Network::new();
    let mut server = FakeServer::start(&net).await;
    let c = client(&net, Duration::from_secs(300));

    let mut aborted = result_of("train", "t-1");
    aborted.set_return_code(AppReturnCode::TaskAborted);
    assert!(
        c.push(SendTaskResult::new(aborted).with_timeout(ANSWERED))
            .await
    );
    let req = server.next(topic::SUBMIT_UPDATE).await;
    assert_eq!(req.message.headers.optional(), Some(true));
    assert_eq!(req.payload().return_code().as_str(), "TASK_ABORTED");

    let mut failed = result_of("train", "t-1");
    failed.set_return_code(AppReturnCode::ExecutionException);
    assert!(
        c.push(SendTaskResult::new(failed).with_timeout(ANSWERED))
            .await
    );
    let req = server.next(topic::SUBMIT_UPDATE).await;
    assert_eq!(req.message.headers.optional(), Some(false));
}

#[actix::test]
async fn task_name_argument_wins_and_context_public_props_are_sent() {
    let net = Network::new();
    let mut server = FakeServer::start(&net).await;
    let c = client(&net, Duration::from_secs(300));

    let mut ctx = within(c.run.send(NewContext)).await.unwrap();
    ctx.set_prop("shown", 1, false, false).unwrap();
    ctx.set_prop("hidden", 2, true, false).unwrap();

    let pushed = within(c.fetcher.send(SendTaskResult {
        result: result_of("from_header", "t-1"),
        task_name: Some("from_argument".into()),
        ctx: Some(ctx.clone()),
        timeout: Some(ANSWERED),
    }))
    .await
    .unwrap()
    .unwrap();
    assert!(pushed);
    let req = server.next(topic::SUBMIT_UPDATE).await;
    assert_eq!(
        req.header(header_key::TASK_NAME).and_then(Value::as_str),
        Some("from_argument")
    );
    assert_eq!(req.peer_ctx().get("shown"), Some(&Value::from(1)));
    assert!(req.peer_ctx().get("hidden").is_none());

    let pulled = within(c.fetcher.send(GetTaskAssignment {
        ctx: Some(ctx),
        timeout: Some(ANSWERED),
    }))
    .await
    .unwrap()
    .unwrap();
    assert!(pulled.task.unwrap().is_try_again());
    let req = server.next(topic::GET_TASK).await;
    assert_eq!(req.peer_ctx().get("shown"), Some(&Value::from(1)));
    assert!(req.peer_ctx().get("hidden").is_none());
}

#[actix::test]
async fn concurrent_pulls_run_one_after_the_other_and_lose_no_last_task_id() {
    let net = Network::new();
    let mut server = FakeServer::start(&net).await;
    let c = client(&net, Duration::from_secs(300));

    server.on_get_task(Reply::Ok(real_task("train", "t-1")));
    server.on_get_task(Reply::Ok(real_task("train", "t-2")));
    let first = c.fetcher.send(GetTaskAssignment {
        ctx: None,
        timeout: Some(ANSWERED),
    });
    let second = c.fetcher.send(GetTaskAssignment {
        ctx: None,
        timeout: Some(ANSWERED),
    });
    let (a, b) = within(async { futures::join!(first, second) }).await;
    let ids: Vec<_> = [a, b]
        .into_iter()
        .map(|r| r.unwrap().unwrap().task.unwrap().task_id.unwrap())
        .collect();
    assert_eq!(ids, ["t-1", "t-2"]);
    // The second request was sent after the first reply was applied: it names t-1.
    let r1 = server.next(topic::GET_TASK).await;
    let r2 = server.next(topic::GET_TASK).await;
    assert!(r1.header(task_header::LAST_TASK_ID).is_none());
    assert_eq!(
        r2.header(task_header::LAST_TASK_ID).and_then(Value::as_str),
        Some("t-1")
    );
    assert_eq!(c.state().await.last_task_id.as_deref(), Some("t-2"));
    c.pull(Some(ANSWERED)).await;
    let r3 = server.next(topic::GET_TASK).await;
    assert_eq!(
        r3.header(task_header::LAST_TASK_ID).and_then(Value::as_str),
        Some("t-2")
    );
}

#[actix::test]
async fn fetcher_state_is_served_while_a_pull_waits() {
    let net = Network::new();
    let mut server = FakeServer::start(&net).await;
    let c = client(&net, Duration::from_secs(300));

    server.on_get_task(Reply::Silent);
    let pull = c.fetcher.send(GetTaskAssignment {
        ctx: None,
        timeout: None,
    });
    let pull = tokio::spawn(pull);
    server.next(topic::GET_TASK).await;
    // The pull is waiting for its (never coming) reply; the mailbox still answers.
    assert_eq!(
        c.state().await.communication_timeout,
        Duration::from_secs(300)
    );
    assert!(
        c.push(SendTaskResult::new(result_of("train", "t-1")).with_timeout(ANSWERED))
            .await
    );
    // Aborting the run ends the waiting pull as a failed pull.
    assert!(within(c.run.send(AbortRun {
        job_id: JOB.into(),
        reason: "test".into(),
    }))
    .await
    .unwrap());
    let outcome = within(pull).await.unwrap().unwrap().unwrap();
    assert!(outcome.task.is_none());
}

#[actix::test]
async fn stopped_own_cell_is_an_error_not_a_failed_pull() {
    let net = Network::new();
    let _server = FakeServer::start(&net).await;
    let c = client(&net, Duration::from_secs(300));
    c.cell.stop().await;
    let pulled = within(c.fetcher.send(GetTaskAssignment {
        ctx: None,
        timeout: Some(ANSWERED),
    }))
    .await
    .unwrap();
    assert!(matches!(pulled, Err(EngineError::CellUnavailable { .. })));
    let pushed = within(c.fetcher.send(SendTaskResult::new(Shareable::new())))
        .await
        .unwrap();
    assert!(matches!(pushed, Err(EngineError::CellUnavailable { .. })));
}

#[actix::test]
async fn parent_fqcn_and_project_name_are_configurable() {
    let net = Network::new();
    let cell = Cell::start(Fqcn::job_cell("relay", JOB).unwrap(), net.clone()).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler = request_handler(move |m: CellMessage| {
        let _ = tx.send(m);
        async move { Ok(Some(CellMessage::new(try_again(1.0, None)))) }
    });
    cell.register_request_handler(channel::SERVER_COMMAND, topic::GET_TASK, handler)
        .await
        .unwrap();
    let run = RunInfo::new(RunInfoConfig::new(SITE, JOB)).start();
    let me = Cell::start(Fqcn::job_cell(SITE, JOB).unwrap(), net.clone()).unwrap();
    let fetcher = TaskFetcher::new(
        TaskFetcherConfig::new(SITE, JOB, me, run)
            .with_parent_fqcn(Fqcn::new("relay").unwrap())
            .with_project_name("proj"),
    )
    .unwrap()
    .start();
    let task = within(fetcher.send(GetTaskAssignment {
        ctx: None,
        timeout: Some(ANSWERED),
    }))
    .await
    .unwrap()
    .unwrap();
    assert!(task.task.unwrap().is_try_again());
    let req = within(rx.recv()).await.unwrap();
    assert_eq!(
        req.headers
            .get(task_header::PROJECT_NAME)
            .and_then(Value::as_str),
        Some("proj")
    );
    assert_eq!(req.headers.destination(), Some("relay.J"));
}

async fn engine(net: &Network) -> EngineHandle {
    ClientEngine::builder(SITE, JOB)
        .communication_timeout(Duration::from_secs(60))
        .start(net)
        .await
        .unwrap()
}

#[actix::test]
async fn engine_handle_pulls_and_pushes_through_the_facade() {
    let net = Network::new();
    let mut server = FakeServer::start(&net).await;
    let e = engine(&net).await;

    server.on_get_task(Reply::Ok(real_task("train", "t-1")));
    let task = e
        .get_task_assignment(Some(ANSWERED))
        .await
        .unwrap()
        .expect("a successful pull");
    assert_eq!(task.task_id.as_deref(), Some("t-1"));
    assert_eq!(e.get_run_info().await.unwrap().current_task_name, "train");
    let req = server.next(topic::GET_TASK).await;
    assert_eq!(
        req.peer_ctx().get("__run_num__").and_then(Value::as_str),
        Some(JOB)
    );
    let state = e.send(GetFetcherState).await.unwrap();
    assert_eq!(state.last_task_id.as_deref(), Some("t-1"));
    assert_eq!(state.communication_timeout, Duration::from_secs(60));

    assert!(e
        .send_task_result(result_of("train", "t-1"), Some(ANSWERED))
        .await
        .unwrap());
    let req = server.next(topic::SUBMIT_UPDATE).await;
    assert_eq!(
        req.header(header_key::TASK_NAME).and_then(Value::as_str),
        Some("train")
    );
    assert_eq!(e.get_run_info().await.unwrap().current_task_name, "");

    server.on_submit(Reply::Fail(HandlerError::Other("boom".into())));
    assert!(!e
        .send_task_result(result_of("train", "t-1"), Some(ANSWERED))
        .await
        .unwrap());
    server.next(topic::SUBMIT_UPDATE).await;

    // The raw facade address takes the same messages.
    server.on_get_task(Reply::Ok(end_run()));
    let pulled = e
        .addr()
        .send(GetTaskAssignment {
            ctx: None,
            timeout: Some(ANSWERED),
        })
        .await
        .unwrap()
        .unwrap();
    assert!(pulled.task.unwrap().is_end_run());
    let pushed = e
        .addr()
        .send(SendTaskResult::new(result_of("train", "t-1")).with_timeout(ANSWERED))
        .await
        .unwrap()
        .unwrap();
    assert!(pushed);

    // A failed pull through the handle is Ok(None).
    server.on_get_task(Reply::NotShareable);
    assert!(e
        .get_task_assignment(Some(ANSWERED))
        .await
        .unwrap()
        .is_none());
}
