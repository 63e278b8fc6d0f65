//! Guarantees of the engine's task path that a real NVFlare deployment relies on: the job's
//! session id (`ssid`), hierarchical sites pulling from their parent, the pull events, the pull's
//! context coming back, and which task replies count as accepted. Checked through the engine's
//! mailboxes against a fake task server: a plain cell whose `server_command` handlers answer
//! from a script and record what they receive.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedrun_cell::{
    header, request_handler, Cell, CellHandle, CellMessage, Deliver, Fqcn, Network, Payload,
    Transport,
};
use fedrun_core::constants::{channel, fl_ctx_key, header_key, task_header, topic};
use fedrun_core::{CellReturnCode, FlContext, Map, PeerContext, Shareable, Value};
use fedrun_engine::{handler_fn, ClientEngine, EngineError, EngineHandle};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

const JOB: &str = "J";
const DEADLINE: Duration = Duration::from_secs(5);
const ANSWERED: Option<Duration> = Some(Duration::from_secs(5));

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("no answer before the deadline")
}

/// What the fake server answers.
#[derive(Clone)]
enum Reply {
    Task(Shareable),
    Payload(Value),
}

/// A transport that removes `cn__return_code` from everything its cell sends (a foreign peer).
#[derive(Clone)]
struct StripReturnCode(Network);

impl Transport for StripReturnCode {
    fn register(
        &self,
        fqcn: Fqcn,
        inbox: actix::Recipient<Deliver>,
    ) -> Result<(), fedrun_cell::CellError> {
        Transport::register(&self.0, fqcn, inbox)
    }

    fn unregister(&self, fqcn: &Fqcn) {
        Transport::unregister(&self.0, fqcn)
    }

    fn route(&self, mut msg: CellMessage) -> BoxFuture<'static, Result<(), CellReturnCode>> {
        msg.headers.remove(header::RETURN_CODE);
        Transport::route(&self.0, msg)
    }
}

/// A fake task server at `<owner>.J`.
struct FakeServer {
    script: Arc<Mutex<VecDeque<Reply>>>,
    received: mpsc::UnboundedReceiver<(String, Shareable)>,
    _cell: CellHandle,
}

impl FakeServer {
    async fn start<T: Transport>(owner: &str, transport: T) -> FakeServer {
        let cell = Cell::start(Fqcn::job_cell(owner, JOB).unwrap(), transport).unwrap();
        let (tx, received) = mpsc::unbounded_channel();
        let script: Arc<Mutex<VecDeque<Reply>>> = Arc::default();
        for name in [topic::GET_TASK, topic::SUBMIT_UPDATE] {
            let script = Arc::clone(&script);
            let tx = tx.clone();
            let handler = request_handler(move |message: CellMessage| {
                let payload = message.payload.as_shareable().cloned().unwrap_or_default();
                let _ = tx.send((name.to_owned(), payload));
                let reply = script.lock().unwrap().pop_front();
                async move {
                    let payload = match reply {
                        Some(Reply::Task(t)) => Payload::from(t),
                        Some(Reply::Payload(v)) => Payload::value(v),
                        None if name == topic::GET_TASK => Payload::from(task("__try_again__")),
                        None => Payload::from(Shareable::new()),
                    };
                    Ok(Some(CellMessage::new(payload)))
                }
            });
            cell.register_request_handler(channel::SERVER_COMMAND, name, handler)
                .await
                .unwrap();
        }
        FakeServer {
            script,
            received,
            _cell: cell,
        }
    }

    fn then(&self, reply: Reply) {
        self.script.lock().unwrap().push_back(reply);
    }

    async fn next(&mut self) -> (String, Shareable) {
        within(self.received.recv()).await.expect("server gone")
    }
}

fn task(name: &str) -> Shareable {
    let mut t = Shareable::new();
    t.set_header(task_header::TASK_NAME, name);
    t.set_header(header_key::TASK_ID, format!("id-{name}"));
    let mut peer = PeerContext::default();
    peer.set("__run_num__", JOB);
    peer.set("__identity_name__", "server");
    t.set_peer_context(peer);
    t
}

fn result_of(name: &str) -> Shareable {
    let mut r = Shareable::new();
    r.set_header(header_key::TASK_NAME, name);
    r
}

async fn engine(site: &str, net: &Network, ssid: Option<&str>) -> EngineHandle {
    let mut b = ClientEngine::builder(site, JOB).job_clients(&[site]);
    if let Some(ssid) = ssid {
        b = b.ssid(ssid);
    }
    within(b.start(net)).await.unwrap()
}

fn ssid_of(ctx: &FlContext) -> Option<String> {
    ctx.get_prop(fl_ctx_key::SSID)
        .and_then(|v| v.as_str().map(str::to_owned))
}

#[actix::test]
async fn pull_stamps_the_job_ssid_and_hands_back_the_peer_context() {
    let net = Network::new();
    let server = FakeServer::start("server", net.clone()).await;
    let e = engine("site-1", &net, Some("NA")).await;
    server.then(Reply::Task(task("train")));
    let pulled = within(e.pull_task(None, ANSWERED)).await.unwrap();
    assert_eq!(pulled.task.as_ref().map(|t| t.name.as_str()), Some("train"));
    assert_eq!(ssid_of(&pulled.ctx).as_deref(), Some("NA"));
    let peer = pulled
        .ctx
        .peer_context()
        .expect("the server's peer context");
    assert_eq!(
        peer.get("__identity_name__").and_then(Value::as_str),
        Some("server")
    );
    // The session id is private: it never travels in the peer context.
    assert!(pulled.ctx.to_peer_context().get(fl_ctx_key::SSID).is_none());
}

#[actix::test]
async fn result_sent_with_the_pull_context_is_accepted() {
    let net = Network::new();
    let mut server = FakeServer::start("server", net.clone()).await;
    let e = engine("site-1", &net, Some("NA")).await;
    server.then(Reply::Task(task("train")));
    let pulled = within(e.pull_task(None, ANSWERED)).await.unwrap();
    assert_eq!(server.next().await.0, topic::GET_TASK);
    let sent = within(e.send_task_result_in(pulled.ctx, result_of("train"), ANSWERED)).await;
    assert!(sent.unwrap());
    let (topic, payload) = server.next().await;
    assert_eq!(topic, topic::SUBMIT_UPDATE);
    assert_eq!(
        payload
            .header_or_none(header_key::TASK_NAME)
            .and_then(Value::as_str),
        Some("train")
    );
}

#[actix::test]
async fn result_of_another_session_or_of_no_session_is_refused_without_sending() {
    let net = Network::new();
    let mut server = FakeServer::start("server", net.clone()).await;
    let e = engine("site-1", &net, Some("NA")).await;
    let mut stale = within(e.new_context()).await.unwrap();
    stale.put(fl_ctx_key::SSID, "old-session", true, false);
    let refused = within(e.send_task_result_in(stale, result_of("a"), ANSWERED)).await;
    assert!(!refused.unwrap());
    let unstamped = within(e.new_context()).await.unwrap();
    let refused = within(e.send_task_result_in(unstamped, result_of("b"), ANSWERED)).await;
    assert!(!refused.unwrap());
    // A push without a context of its own belongs to the current session and is sent; it is
    // the first thing the server receives, so the refused ones never left.
    assert!(within(e.send_task_result(result_of("c"), ANSWERED))
        .await
        .unwrap());
    let (topic, payload) = server.next().await;
    assert_eq!(topic, topic::SUBMIT_UPDATE);
    assert_eq!(
        payload
            .header_or_none(header_key::TASK_NAME)
            .and_then(Value::as_str),
        Some("c")
    );
}

#[actix::test]
async fn without_ssid_a_context_stamped_with_a_session_is_refused() {
    let net = Network::new();
    let _server = FakeServer::start("server", net.clone()).await;
    let e = engine("site-1", &net, None).await;
    let plain = within(e.new_context()).await.unwrap();
    assert!(
        within(e.send_task_result_in(plain, result_of("a"), ANSWERED))
            .await
            .unwrap()
    );
    let mut stamped = within(e.new_context()).await.unwrap();
    stamped.put(fl_ctx_key::SSID, "NA", true, false);
    assert!(
        !within(e.send_task_result_in(stamped, result_of("b"), ANSWERED))
            .await
            .unwrap()
    );
}

#[actix::test]
async fn pull_events_fire_before_and_after_each_pull_and_see_the_session_after() {
    let net = Network::new();
    let server = FakeServer::start("server", net.clone()).await;
    let e = engine("site-1", &net, Some("NA")).await;
    let (tx, mut seen) = mpsc::unbounded_channel();
    let recorder = handler_fn("recorder", move |event: &str, ctx: &mut FlContext| {
        if event.ends_with("_pull_task") {
            let _ = tx.send((event.to_owned(), ssid_of(ctx)));
        }
        Ok(())
    });
    within(e.add_handler(recorder)).await.unwrap();
    server.then(Reply::Task(task("train")));
    within(e.pull_task(None, ANSWERED)).await.unwrap();
    let first = within(seen.recv()).await.unwrap();
    let second = within(seen.recv()).await.unwrap();
    assert_eq!(first, ("_before_pull_task".to_owned(), None));
    assert_eq!(
        second,
        ("_after_pull_task".to_owned(), Some("NA".to_owned()))
    );
}

#[actix::test]
async fn submit_update_answered_ok_with_an_empty_string_payload_is_success() {
    let net = Network::new();
    let server = FakeServer::start("server", net.clone()).await;
    let e = engine("site-1", &net, None).await;
    // NVFlare's server job answers submit_update with payload "" and cn__return_code ok.
    server.then(Reply::Payload(Value::from("")));
    assert!(within(e.send_task_result(result_of("train"), ANSWERED))
        .await
        .unwrap());
}

#[actix::test]
async fn task_replies_without_a_cell_return_code_are_failures() {
    let net = Network::new();
    let server = FakeServer::start("server", StripReturnCode(net.clone())).await;
    let e = engine("site-1", &net, None).await;
    server.then(Reply::Task(task("train")));
    let pulled = within(e.pull_task(None, ANSWERED)).await.unwrap();
    assert!(
        pulled.task.is_none(),
        "a get_task reply without a code is a failed pull"
    );
    let mut accepted = Shareable::new();
    accepted.set_return_code(fedrun_core::AppReturnCode::Ok);
    server.then(Reply::Task(accepted));
    let sent = within(e.send_task_result(result_of("train"), ANSWERED)).await;
    assert!(
        !sent.unwrap(),
        "a submit_update reply without a code was never accepted"
    );
}

fn hierarchy_meta(clients: &[(&str, &str)]) -> Value {
    let list: Vec<Value> = clients
        .iter()
        .map(|(name, fqsn)| {
            Value::Map(Map::from_iter([
                ("name", Value::from(*name)),
                ("fqsn", Value::from(*fqsn)),
            ]))
        })
        .collect();
    Value::Map(Map::from_iter([("job_clients", Value::Array(list))]))
}

fn child_config(fqsn: &str) -> Map {
    Map::from_iter([("fqsn", Value::from(fqsn))])
}

#[actix::test]
async fn a_child_site_pulls_from_and_pushes_to_its_parents_job_cell() {
    let net = Network::new();
    // No server job at all: only the parent site's job cell answers task traffic.
    let mut parent = FakeServer::start("site-a", net.clone()).await;
    let meta = hierarchy_meta(&[("site-a", "site-a"), ("site-1", "site-a.site-1")]);
    let e = ClientEngine::builder("site-1", JOB)
        .client_config(child_config("site-a.site-1"))
        .job_meta(meta)
        .start(&net);
    let e = within(e).await.unwrap();
    assert_eq!(e.parent(), Some("site-a"));
    assert_eq!(e.parent_reply_key(), "site-a");
    parent.then(Reply::Task(task("train")));
    let pulled = within(e.pull_task(None, ANSWERED)).await.unwrap();
    assert_eq!(pulled.task.map(|t| t.name), Some("train".to_owned()));
    assert!(
        within(e.send_task_result_in(pulled.ctx, result_of("train"), ANSWERED))
            .await
            .unwrap()
    );
    assert_eq!(parent.next().await.0, topic::GET_TASK);
    assert_eq!(parent.next().await.0, topic::SUBMIT_UPDATE);
}

#[actix::test]
async fn an_unknown_parent_is_an_error_at_start() {
    let net = Network::new();
    let started = ClientEngine::builder("site-1", JOB)
        .client_config(child_config("site-x.site-1"))
        .job_clients(&["site-1"])
        .start(&net);
    let err = within(started).await.unwrap_err();
    assert_eq!(
        err,
        EngineError::UnknownParent {
            parent: "site-x".into(),
            fqsn: "site-x.site-1".into()
        }
    );
    // The failed start released the cell name: a corrected engine starts on it.
    let again = ClientEngine::builder("site-1", JOB).start(&net);
    assert!(within(again).await.is_ok());
}

#[actix::test]
async fn without_job_clients_a_hierarchical_site_cannot_start() {
    let net = Network::new();
    let started = ClientEngine::builder("site-1", JOB)
        .client_config(child_config("site-a.site-1"))
        .start(&net);
    let err = within(started).await.unwrap_err();
    assert!(matches!(err, EngineError::UnknownParent { .. }), "{err}");
}
