//! Guarantees of the `AuxRunner` actor, checked on a whole federation in one in-process network:
//! a server job (an `SJ` aux runner on `server.<job>`), the server's parent cell (`server`), and
//! three client jobs (`site-N.<job>`, each with its own run and aux runner, job clients loaded
//! from the job meta).
//!
//! (The file is not called `aux.rs`: `aux` is a reserved file name on Windows.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Context, Handler};
use fedrun_cell::{
    request_handler, Cell, CellHandle, CellMessage, Fqcn, Network, Payload, SendRequest,
};
use fedrun_core::constants::{fl_ctx_key, header_key};
use fedrun_core::{Map, Shareable, Value};
use fedrun_engine::{
    aux_handler, AbortRun, AuxConfig, AuxRequest, AuxRunner, AuxTargets, EngineError,
    FireAndForgetAuxRequest, GetClientFromName, GetClients, GetJobClients, MulticastAuxRequests,
    NewContext, RegisterAuxMessageHandler, RunInfo, RunInfoConfig, SendAuxRequest, ShowErrors,
    ValidateTargets,
};
use tokio::sync::{mpsc, oneshot};

/// The deadline of every wait in these tests.
const DEADLINE: Duration = Duration::from_secs(5);
/// The timeout of requests that are expected to be answered.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const SITES: [&str; 3] = ["site-1", "site-2", "site-3"];

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("no answer before the deadline")
}

/// Sends `msg` to `addr` and waits for the reply, with a deadline.
async fn ask<A, M>(addr: &Addr<A>, msg: M) -> M::Result
where
    A: Actor<Context = Context<A>> + Handler<M>,
    M: actix::Message + Send + 'static,
    M::Result: Send,
{
    within(addr.send(msg)).await.expect("actor mailbox closed")
}

fn client_dict(name: &str, fqsn: Option<&str>) -> Value {
    let mut d = Map::new();
    d.insert("name", name);
    if let Some(fqsn) = fqsn {
        d.insert("fqsn", fqsn);
    }
    Value::Map(d)
}

fn meta_of(clients: Vec<Value>) -> Value {
    let mut meta = Map::new();
    meta.insert("job_clients", clients);
    Value::Map(meta)
}

fn job_meta() -> Value {
    meta_of(SITES.iter().map(|s| client_dict(s, None)).collect())
}

/// One job process: its run, its cell and its aux runner, and how often its `echo` handler ran.
struct Site {
    run: Addr<RunInfo>,
    cell: CellHandle,
    aux: Addr<AuxRunner>,
    echo_calls: Arc<AtomicUsize>,
}

struct Federation {
    job: String,
    net: Network,
    server: Site,
    /// The server's parent process: a plain cell answering every aux message.
    parent: CellHandle,
    sites: Vec<Site>,
}

impl Federation {
    fn site(&self, name: &str) -> &Site {
        let i = SITES.iter().position(|s| *s == name).unwrap();
        &self.sites[i]
    }

    /// A plain cell in the job, for raw cell messages.
    fn probe(&self) -> CellHandle {
        Cell::start(
            Fqcn::job_cell("probe", &self.job).unwrap(),
            self.net.clone(),
        )
        .unwrap()
    }
}

/// The `echo` handler: answers who answered, who asked (the peer context), the request's `x` and
/// the `__topic__` header it arrived with; counts its calls.
fn echo(calls: Arc<AtomicUsize>) -> fedrun_engine::AuxHandler {
    aux_handler(move |req: AuxRequest| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut reply = Shareable::new();
            reply.insert("who", req.ctx.identity_name());
            let peer = req
                .ctx
                .peer_context()
                .and_then(|p| p.get(fl_ctx_key::IDENTITY_NAME))
                .cloned()
                .unwrap_or(Value::Nil);
            reply.insert("peer", peer);
            reply.insert("x", req.request.get("x").cloned().unwrap_or(Value::Nil));
            let topic = req
                .request
                .header_or_none(header_key::TOPIC)
                .cloned()
                .unwrap_or(Value::Nil);
            reply.insert("topic_header", topic);
            Ok(reply)
        }
    })
}

async fn start_site(
    net: &Network,
    name: &str,
    job: &str,
    process_type: &str,
    load_clients: bool,
    check_run_mismatch: bool,
) -> Site {
    let run = RunInfo::new(RunInfoConfig::new(name, job).with_job_meta(job_meta())).start();
    let cell = Cell::start(Fqcn::job_cell(name, job).unwrap(), net.clone()).unwrap();
    let config = AuxConfig::new(name, job, cell.clone(), run.clone())
        .with_process_type(process_type)
        .with_check_run_mismatch(check_run_mismatch);
    let aux = AuxRunner::new(config).start();
    let echo_calls = Arc::new(AtomicUsize::new(0));
    ask(
        &aux,
        RegisterAuxMessageHandler::new("echo", echo(echo_calls.clone())),
    )
    .await
    .unwrap();
    if load_clients {
        let clients = ask(&aux, GetJobClients { job_meta: None }).await.unwrap();
        assert_eq!(clients.len(), SITES.len());
    }
    Site {
        run,
        cell,
        aux,
        echo_calls,
    }
}

async fn federation(job: &str) -> Federation {
    let net = Network::new();
    let server = start_site(&net, "server", job, "SJ", true, false).await;
    let parent = Cell::start(Fqcn::SERVER, net.clone()).unwrap();
    parent
        .register_request_handler(
            "aux_communication",
            "*",
            request_handler(|req: CellMessage| async move {
                let mut reply = Shareable::new();
                reply.insert("who", "server_parent");
                reply.insert("topic", req.headers.topic().unwrap_or_default());
                Ok(Some(CellMessage::new(reply)))
            }),
        )
        .await
        .unwrap();
    let mut sites = Vec::new();
    for name in SITES {
        sites.push(start_site(&net, name, job, "CJ", true, false).await);
    }
    Federation {
        job: job.to_owned(),
        net,
        server,
        parent,
        sites,
    }
}

fn request_with_x(x: i64) -> Shareable {
    let mut s = Shareable::new();
    s.insert("x", x);
    s
}

fn str_of<'a>(s: &'a Shareable, key: &str) -> Option<&'a str> {
    s.get(key).and_then(Value::as_str)
}

fn rc(s: &Shareable) -> String {
    s.return_code().as_str().to_owned()
}

async fn send(
    from: &Site,
    targets: impl Into<AuxTargets>,
    topic: &str,
    request: Shareable,
) -> Result<fedrun_engine::AuxReplies, EngineError> {
    ask(
        &from.aux,
        SendAuxRequest::new(targets, topic, request, REQUEST_TIMEOUT),
    )
    .await
}

/// A raw cell request from `probe` to the aux channel of `target`; returns the reply Shareable.
async fn raw_aux(
    probe: &CellHandle,
    target: &CellHandle,
    topic: &str,
    payload: Payload,
) -> Shareable {
    let req = SendRequest::new(
        "aux_communication",
        topic,
        target.fqcn().clone(),
        CellMessage::new(payload),
        REQUEST_TIMEOUT,
    );
    let reply = within(probe.send_request(req)).await.unwrap();
    assert!(
        reply.return_code().is_ok(),
        "cell code {}",
        reply.return_code()
    );
    reply
        .payload
        .into_shareable()
        .expect("reply is a Shareable")
}

fn peer_props_of(site: &str, job: &str) -> Map {
    let mut props = Map::new();
    props.insert(fl_ctx_key::IDENTITY_NAME, site);
    props.insert(fl_ctx_key::RUN_NUM, job);
    props
}

// ----------------------------------------------------------------------------------------------
// Targets and reply keys

#[actix::test]
async fn server_target_reaches_the_job_server_and_is_keyed_server() {
    let fed = federation("j-server").await;
    let site1 = fed.site("site-1");
    for targets in [
        AuxTargets::Server,
        AuxTargets::from(""),
        AuxTargets::from("SERVER"),
    ] {
        let replies = send(site1, targets, "echo", request_with_x(7))
            .await
            .unwrap();
        assert_eq!(replies.len(), 1);
        let reply = &replies["server"];
        assert_eq!(rc(reply), "OK");
        assert_eq!(str_of(reply, "who"), Some("server"));
        assert_eq!(str_of(reply, "peer"), Some("site-1"));
        assert_eq!(reply.get("x"), Some(&Value::from(7)));
        assert_eq!(str_of(reply, "topic_header"), Some("echo"));
    }
    assert_eq!(fed.server.echo_calls.load(Ordering::SeqCst), 3);
}

#[actix::test]
async fn server_parent_target_reaches_the_parent_cell_and_is_keyed_server_parent() {
    let fed = federation("j-parent").await;
    let replies = send(
        fed.site("site-1"),
        "Server_Parent",
        "echo",
        Shareable::new(),
    )
    .await
    .unwrap();
    assert_eq!(replies.keys().collect::<Vec<_>>(), ["server_parent"]);
    assert_eq!(
        str_of(&replies["server_parent"], "who"),
        Some("server_parent")
    );
    assert_eq!(str_of(&replies["server_parent"], "topic"), Some("echo"));
    assert_eq!(fed.server.echo_calls.load(Ordering::SeqCst), 0);
    // both server flavours in one send: two keys, no collision (#19)
    let replies = send(
        fed.site("site-1"),
        vec!["server", "server_parent"],
        "echo",
        Shareable::new(),
    )
    .await
    .unwrap();
    assert_eq!(str_of(&replies["server"], "who"), Some("server"));
    assert_eq!(
        str_of(&replies["server_parent"], "who"),
        Some("server_parent")
    );
    drop(fed.parent);
}

#[actix::test]
async fn site_and_sites_targets_reply_keyed_by_client_name() {
    let fed = federation("j-sites").await;
    let site1 = fed.site("site-1");
    let replies = send(site1, "site-2", "echo", request_with_x(1))
        .await
        .unwrap();
    assert_eq!(replies.len(), 1);
    assert_eq!(str_of(&replies["site-2"], "who"), Some("site-2"));
    assert_eq!(str_of(&replies["site-2"], "peer"), Some("site-1"));
    // the reply carries the responder's public props as its peer context
    let peer = replies["site-2"]
        .peer_context()
        .expect("peer context on reply");
    assert_eq!(
        peer.get(fl_ctx_key::IDENTITY_NAME).and_then(Value::as_str),
        Some("site-2")
    );
    assert_eq!(
        peer.get(fl_ctx_key::RUN_NUM).and_then(Value::as_str),
        Some("j-sites")
    );

    let replies = send(
        site1,
        vec!["site-2", "site-3", "site-1"],
        "echo",
        request_with_x(2),
    )
    .await
    .unwrap();
    let mut keys: Vec<_> = replies.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["site-1", "site-2", "site-3"]);
    for (name, reply) in &replies {
        assert_eq!(str_of(reply, "who"), Some(name.as_str()));
        assert_eq!(reply.get("x"), Some(&Value::from(2)));
    }
}

#[actix::test]
async fn all_targets_the_server_and_every_other_client() {
    let fed = federation("j-all").await;
    let replies = send(fed.site("site-2"), "@ALL", "echo", Shareable::new())
        .await
        .unwrap();
    let mut keys: Vec<_> = replies.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["server", "site-1", "site-3"]);
    assert_eq!(fed.site("site-2").echo_calls.load(Ordering::SeqCst), 0);
    for (name, reply) in &replies {
        assert_eq!(str_of(reply, "who"), Some(name.as_str()));
    }
}

#[actix::test]
async fn unknown_name_fails_before_anything_is_sent() {
    let fed = federation("j-unknown").await;
    let site1 = fed.site("site-1");
    let err = send(site1, vec!["site-2", "nope"], "echo", Shareable::new())
        .await
        .unwrap_err();
    assert_eq!(err, EngineError::UnknownTarget("nope".into()));
    // case matters for client names; "@ALL" inside a list is just a name
    for bad in [AuxTargets::from("SITE-2"), AuxTargets::from(vec!["@ALL"])] {
        assert!(matches!(
            send(site1, bad, "echo", Shareable::new()).await,
            Err(EngineError::UnknownTarget(_))
        ));
    }
    let err = ask(
        &site1.aux,
        MulticastAuxRequests::new(
            "echo",
            vec![
                ("site-2".into(), Shareable::new()),
                ("ghost".into(), Shareable::new()),
            ],
            REQUEST_TIMEOUT,
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(err, EngineError::UnknownTarget("ghost".into()));
    // a later good request is the only one site-2 ever handled: nothing was sent before
    send(site1, "site-2", "echo", Shareable::new())
        .await
        .unwrap();
    assert_eq!(fed.site("site-2").echo_calls.load(Ordering::SeqCst), 1);
}

#[actix::test]
async fn all_before_job_clients_are_loaded_is_an_error() {
    let net = Network::new();
    let site = start_site(&net, "site-1", "j-early", "CJ", false, false).await;
    assert_eq!(ask(&site.aux, GetClients).await, None);
    let err = send(&site, AuxTargets::All, "echo", Shareable::new())
        .await
        .unwrap_err();
    assert_eq!(err, EngineError::JobClientsNotLoaded);
    // a client name is unknown too, before loading
    assert_eq!(
        send(&site, "site-2", "echo", Shareable::new())
            .await
            .unwrap_err(),
        EngineError::UnknownTarget("site-2".into())
    );
}

#[actix::test]
async fn validate_targets_and_lookups_use_the_send_rule() {
    let fed = federation("j-validate").await;
    let site1 = fed.site("site-1");
    let names = [
        "server",
        "SERVER",
        "server_parent",
        "site-2",
        "x",
        "site-1",
        "@ALL",
        "site-2",
    ]
    .map(str::to_owned)
    .to_vec();
    let (valid, invalid) = ask(&site1.aux, ValidateTargets { names }).await;
    assert_eq!(
        valid,
        [
            "server",
            "SERVER",
            "server_parent",
            "site-2",
            "site-1",
            "site-2"
        ]
    );
    assert_eq!(invalid, ["x", "@ALL"]);
    let c = ask(
        &site1.aux,
        GetClientFromName {
            name: "site-3".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!((c.name.as_str(), c.fqcn.as_str()), ("site-3", "site-3"));
    assert!(ask(
        &site1.aux,
        GetClientFromName {
            name: "Site-3".into()
        }
    )
    .await
    .is_none());
    let names: Vec<String> = ask(&site1.aux, GetClients)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, SITES);
}

// ----------------------------------------------------------------------------------------------
// Handlers

#[actix::test]
async fn handler_error_answers_handler_exception_and_is_reported() {
    let fed = federation("j-fail").await;
    let site2 = fed.site("site-2");
    ask(
        &site2.aux,
        RegisterAuxMessageHandler::new(
            "fail",
            aux_handler(|_req| async move { Err::<Shareable, _>("disk full".to_owned()) }),
        ),
    )
    .await
    .unwrap();
    let replies = send(fed.site("site-1"), "site-2", "fail", Shareable::new())
        .await
        .unwrap();
    assert_eq!(rc(&replies["site-2"]), "HANDLER_EXCEPTION");
    let report = ask(&site2.run, ShowErrors).await.expect("error recorded");
    let records = report.records("AuxRunner", "error");
    assert_eq!(records.len(), 1);
    assert!(
        records[0].message.contains("disk full"),
        "{}",
        records[0].message
    );
    assert!(records[0].message.contains("HANDLER_EXCEPTION"));
}

#[actix::test]
async fn panicking_handler_answers_handler_exception_and_the_runner_keeps_serving() {
    let fed = federation("j-panic").await;
    let site2 = fed.site("site-2");
    ask(
        &site2.aux,
        RegisterAuxMessageHandler::new(
            "panic",
            aux_handler(|_req| async move {
                if true {
                    panic!("handler bug");
                }
                Ok(Shareable::new())
            }),
        ),
    )
    .await
    .unwrap();
    // a handler that panics before returning its future is caught too
    ask(
        &site2.aux,
        RegisterAuxMessageHandler::new(
            "panic-early",
            fedrun_engine::AuxHandler::Fn(Arc::new(|_req| panic!("no future for you"))),
        ),
    )
    .await
    .unwrap();
    let site1 = fed.site("site-1");
    for topic in ["panic", "panic-early"] {
        let replies = send(site1, "site-2", topic, Shareable::new())
            .await
            .unwrap();
        assert_eq!(rc(&replies["site-2"]), "HANDLER_EXCEPTION", "topic {topic}");
    }
    let replies = send(site1, "site-2", "echo", request_with_x(5))
        .await
        .unwrap();
    assert_eq!(rc(&replies["site-2"]), "OK");
    assert_eq!(replies["site-2"].get("x"), Some(&Value::from(5)));
}

#[actix::test]
async fn silent_handler_times_out_within_the_request_timeout() {
    let fed = federation("j-silent").await;
    let site2 = fed.site("site-2");
    ask(
        &site2.aux,
        RegisterAuxMessageHandler::new(
            "silent",
            aux_handler(|_req| futures::future::pending::<Result<Shareable, String>>()),
        ),
    )
    .await
    .unwrap();
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let replies = ask(
        &fed.site("site-1").aux,
        SendAuxRequest::new("site-2", "silent", Shareable::new(), timeout),
    )
    .await
    .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(rc(&replies["site-2"]), "TIMEOUT");
    assert!(elapsed >= timeout, "answered after {elapsed:?}");
    // the pending handler does not stall its runner: site-2 still answers
    let replies = send(fed.site("site-1"), "site-2", "echo", Shareable::new())
        .await
        .unwrap();
    assert_eq!(rc(&replies["site-2"]), "OK");
}

#[actix::test]
async fn actor_handler_answers_requests() {
    struct Greeter;
    impl Actor for Greeter {
        type Context = Context<Self>;
    }
    impl Handler<AuxRequest> for Greeter {
        type Result = Result<Shareable, String>;
        fn handle(&mut self, req: AuxRequest, _ctx: &mut Context<Self>) -> Self::Result {
            let mut reply = Shareable::new();
            reply.insert("greeted", req.topic);
            Ok(reply)
        }
    }
    let fed = federation("j-actor").await;
    let greeter = Greeter.start();
    ask(
        &fed.site("site-3").aux,
        RegisterAuxMessageHandler::new("greet", greeter.recipient()),
    )
    .await
    .unwrap();
    let replies = send(fed.site("site-1"), "site-3", "greet", Shareable::new())
        .await
        .unwrap();
    assert_eq!(str_of(&replies["site-3"], "greeted"), Some("greet"));
}

#[actix::test]
async fn duplicate_and_empty_topic_registrations_are_rejected() {
    let fed = federation("j-register").await;
    let aux = &fed.site("site-1").aux;
    let calls = Arc::new(AtomicUsize::new(0));
    let err = ask(
        aux,
        RegisterAuxMessageHandler::new("echo", echo(calls.clone())),
    )
    .await
    .unwrap_err();
    assert_eq!(err, EngineError::DuplicateAuxHandler("echo".into()));
    assert_eq!(err.to_string(), "handler already registered for topic echo");
    let err = ask(aux, RegisterAuxMessageHandler::new("", echo(calls.clone())))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "topic must not be empty");
    // the first handler is still the one answering
    send(fed.site("site-2"), "site-1", "echo", Shareable::new())
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(fed.site("site-1").echo_calls.load(Ordering::SeqCst), 1);
    // sends need a topic too
    assert_eq!(
        send(fed.site("site-2"), "site-1", "", Shareable::new()).await,
        Err(EngineError::EmptyTopic)
    );
    // whitespace is a topic like any other
    ask(aux, RegisterAuxMessageHandler::new(" ", echo(calls)))
        .await
        .unwrap();
}

// ----------------------------------------------------------------------------------------------
// Incoming checks

#[actix::test]
async fn unknown_topic_answers_topic_unknown_and_is_reported_to_the_run() {
    let fed = federation("j-topic").await;
    let replies = send(
        fed.site("site-1"),
        "site-2",
        "no-such-topic",
        Shareable::new(),
    )
    .await
    .unwrap();
    assert_eq!(rc(&replies["site-2"]), "TOPIC_UNKNOWN");
    let report = ask(&fed.site("site-2").run, ShowErrors).await.unwrap();
    let records = report.records("AuxRunner", "error");
    assert_eq!(records.len(), 1);
    assert!(records[0].message.contains("no-such-topic"));
    assert!(records[0].message.contains("TOPIC_UNKNOWN"));
    assert!(
        records[0].message.contains("site-1.j-topic"),
        "origin in {}",
        records[0].message
    );
    // the sender's own log stays clean
    assert!(ask(&fed.site("site-1").run, ShowErrors).await.is_none());
}

#[actix::test]
async fn request_without_peer_props_answers_missing_peer_context() {
    let fed = federation("j-missing").await;
    let probe = fed.probe();
    let target = &fed.site("site-1").cell;
    let reply = raw_aux(&probe, target, "echo", Payload::shareable(Shareable::new())).await;
    assert_eq!(rc(&reply), "MISSING_PEER_CONTEXT");
    let mut empty_props = Shareable::new();
    empty_props.set_peer_props(Map::new());
    let reply = raw_aux(&probe, target, "echo", Payload::shareable(empty_props)).await;
    assert_eq!(rc(&reply), "MISSING_PEER_CONTEXT");
    // an unknown topic is reported as such even without peer props (topic is checked first)
    let reply = raw_aux(&probe, target, "nope", Payload::shareable(Shareable::new())).await;
    assert_eq!(rc(&reply), "TOPIC_UNKNOWN");
    assert_eq!(fed.site("site-1").echo_calls.load(Ordering::SeqCst), 0);
    // with peer props the same raw request is served
    let mut ok = Shareable::new();
    ok.set_peer_props(peer_props_of("probe", "j-missing"));
    let reply = raw_aux(&probe, target, "echo", Payload::shareable(ok)).await;
    assert_eq!(rc(&reply), "OK");
    assert_eq!(str_of(&reply, "peer"), Some("probe"));
}

#[actix::test]
async fn peer_props_that_are_a_list_answer_bad_peer_context() {
    let fed = federation("j-badpeer").await;
    let probe = fed.probe();
    let mut req = Shareable::new();
    req.set_header(
        header_key::PEER_PROPS,
        vec![Value::from("not"), Value::from("a map")],
    );
    // checked before the topic: even an unknown topic gets BAD_PEER_CONTEXT
    for topic in ["echo", "nope"] {
        let reply = raw_aux(
            &probe,
            &fed.site("site-1").cell,
            topic,
            Payload::shareable(req.clone()),
        )
        .await;
        assert_eq!(rc(&reply), "BAD_PEER_CONTEXT", "topic {topic}");
    }
    assert_eq!(fed.site("site-1").echo_calls.load(Ordering::SeqCst), 0);
}

#[actix::test]
async fn payload_that_is_not_a_shareable_answers_bad_request_data() {
    let fed = federation("j-baddata").await;
    let probe = fed.probe();
    for payload in [
        Payload::value(42),
        Payload::None,
        Payload::value("just text"),
    ] {
        let reply = raw_aux(&probe, &fed.site("site-1").cell, "echo", payload).await;
        assert_eq!(rc(&reply), "BAD_REQUEST_DATA");
    }
    let report = ask(&fed.site("site-1").run, ShowErrors).await.unwrap();
    assert_eq!(report.records("AuxRunner", "error").len(), 3);
}

#[actix::test]
async fn run_mismatch_check_rejects_other_jobs_when_enabled() {
    let net = Network::new();
    let strict = start_site(&net, "site-1", "j-run", "CJ", false, true).await;
    let lax = start_site(&net, "site-2", "j-run", "CJ", false, false).await;
    let probe = Cell::start(Fqcn::job_cell("probe", "j-run").unwrap(), net.clone()).unwrap();
    let mut other_job = Shareable::new();
    other_job.set_peer_props(peer_props_of("probe", "j-other"));
    let mut no_job = Shareable::new();
    no_job.set_peer_props(Map::from_iter([(fl_ctx_key::IDENTITY_NAME, "probe")]));
    let mut same_job = Shareable::new();
    same_job.set_peer_props(peer_props_of("probe", "j-run"));
    for (req, strict_rc) in [
        (other_job, "RUN_MISMATCH"),
        (no_job, "RUN_MISMATCH"),
        (same_job, "OK"),
    ] {
        let reply = raw_aux(
            &probe,
            &strict.cell,
            "echo",
            Payload::shareable(req.clone()),
        )
        .await;
        assert_eq!(rc(&reply), strict_rc);
        let reply = raw_aux(&probe, &lax.cell, "echo", Payload::shareable(req)).await;
        assert_eq!(rc(&reply), "OK", "the check is off by default");
    }
}

#[actix::test]
async fn cookie_jar_is_echoed_on_ok_and_error_replies() {
    let fed = federation("j-cookie").await;
    let mut req = Shareable::new();
    req.add_cookie("round", 3);
    req.add_cookie("task", "t-1");
    let site1 = fed.site("site-1");
    let ok = send(site1, "site-2", "echo", req.clone()).await.unwrap();
    let unknown = send(site1, "site-2", "nope", req.clone()).await.unwrap();
    for reply in [&ok["site-2"], &unknown["site-2"]] {
        assert_eq!(reply.cookie("round"), Some(&Value::from(3)));
        assert_eq!(reply.cookie("task").and_then(Value::as_str), Some("t-1"));
    }
    assert_eq!(rc(&unknown["site-2"]), "TOPIC_UNKNOWN");
    // a raw error reply (bad peer context) carries it too
    req.set_header(header_key::PEER_PROPS, "not a map");
    let reply = raw_aux(
        &fed.probe(),
        &fed.site("site-2").cell,
        "echo",
        Payload::shareable(req),
    )
    .await;
    assert_eq!(rc(&reply), "BAD_PEER_CONTEXT");
    assert_eq!(reply.cookie("round"), Some(&Value::from(3)));
}

// ----------------------------------------------------------------------------------------------
// Multicast, fire-and-forget, headers

#[actix::test]
async fn multicast_sends_a_different_request_per_target_and_waits_for_replies() {
    let fed = federation("j-multi").await;
    let site1 = fed.site("site-1");
    let replies = ask(
        &site1.aux,
        MulticastAuxRequests::new(
            "echo",
            vec![
                ("site-2".into(), request_with_x(2)),
                ("site-3".into(), request_with_x(3)),
                ("server".into(), request_with_x(0)),
            ],
            REQUEST_TIMEOUT,
        ),
    )
    .await
    .unwrap();
    assert_eq!(replies.len(), 3);
    assert_eq!(replies["site-2"].get("x"), Some(&Value::from(2)));
    assert_eq!(replies["site-3"].get("x"), Some(&Value::from(3)));
    assert_eq!(replies["server"].get("x"), Some(&Value::from(0)));
    for reply in replies.values() {
        assert_eq!(str_of(reply, "peer"), Some("site-1"));
        assert_eq!(str_of(reply, "topic_header"), Some("echo"));
    }
    let none = ask(
        &site1.aux,
        MulticastAuxRequests::new("echo", vec![], REQUEST_TIMEOUT),
    )
    .await
    .unwrap();
    assert!(none.is_empty());
}

/// Cell headers seen by a raw handler: (topic, destination, secure, reply expected, root id,
/// root ttl, pass through).
type Seen = (
    String,
    String,
    Option<bool>,
    Option<bool>,
    Option<String>,
    Option<f64>,
    Option<bool>,
);

/// Registers, on `cell`, a raw handler for the exact aux `topic` (it wins over the runner's
/// wildcard) that reports the headers it sees and answers with an empty Shareable.
async fn header_probe(cell: &CellHandle, topic: &str, seen: mpsc::UnboundedSender<Seen>) {
    cell.register_request_handler(
        "aux_communication",
        topic,
        request_handler(move |req: CellMessage| {
            let h = &req.headers;
            let _ = seen.send((
                h.topic().unwrap_or_default().to_owned(),
                h.destination().unwrap_or_default().to_owned(),
                h.secure(),
                h.reply_expected(),
                h.msg_root_id().map(str::to_owned),
                h.msg_root_ttl(),
                h.pass_through(),
            ));
            async move { Ok(Some(CellMessage::new(Shareable::new()))) }
        }),
    )
    .await
    .unwrap();
}

#[actix::test]
async fn fire_and_forget_is_delivered_and_keeps_secure() {
    let fed = federation("j-ff").await;
    // delivered to the server's aux handler
    let (tx, rx) = oneshot::channel::<String>();
    let slot = Arc::new(Mutex::new(Some(tx)));
    ask(
        &fed.server.aux,
        RegisterAuxMessageHandler::new(
            "ff",
            aux_handler(move |req: AuxRequest| {
                let tx = slot.lock().unwrap().take();
                async move {
                    let peer = req
                        .ctx
                        .peer_context()
                        .and_then(|p| p.get(fl_ctx_key::IDENTITY_NAME))
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    if let Some(tx) = tx {
                        let _ = tx.send(peer);
                    }
                    Ok(Shareable::new())
                }
            }),
        ),
    )
    .await
    .unwrap();
    let site1 = fed.site("site-1");
    ask(
        &site1.aux,
        FireAndForgetAuxRequest::new("ff", Shareable::new()),
    )
    .await
    .unwrap();
    assert_eq!(within(rx).await.unwrap(), "site-1");

    // secure is kept on the wire (#16), for FireAndForgetAuxRequest and for a zero timeout
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    header_probe(&fed.server.cell, "ff_probe", seen_tx).await;
    ask(
        &site1.aux,
        FireAndForgetAuxRequest::new("ff_probe", Shareable::new()).with_secure(true),
    )
    .await
    .unwrap();
    let (topic, dest, secure, reply_expected, ..) = within(seen.recv()).await.unwrap();
    assert_eq!((topic.as_str(), dest.as_str()), ("ff_probe", "server.j-ff"));
    assert_eq!(secure, Some(true));
    assert_eq!(reply_expected, Some(false));
    let replies = ask(
        &site1.aux,
        SendAuxRequest::new("server", "ff_probe", Shareable::new(), Duration::ZERO)
            .with_secure(true),
    )
    .await
    .unwrap();
    assert!(replies.is_empty(), "fire-and-forget replies nothing");
    let (_, _, secure, reply_expected, ..) = within(seen.recv()).await.unwrap();
    assert_eq!((secure, reply_expected), (Some(true), Some(false)));
}

#[actix::test]
async fn msg_root_headers_are_copied_for_unicast_and_multicast() {
    let fed = federation("j-root").await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    header_probe(&fed.site("site-2").cell, "root_probe", seen_tx.clone()).await;
    header_probe(&fed.site("site-3").cell, "root_probe", seen_tx).await;
    let rooted = |id: &str, ttl: f64, pass: bool| {
        let mut s = Shareable::new();
        s.set_header(header_key::MSG_ROOT_ID, id);
        s.set_header(header_key::MSG_ROOT_TTL, ttl);
        if pass {
            s.set_header(header_key::PASS_THROUGH, true);
        }
        s
    };
    let site1 = fed.site("site-1");
    send(site1, "site-2", "root_probe", rooted("root-u", 60.0, true))
        .await
        .unwrap();
    let (_, dest, _, _, id, ttl, pass) = within(seen.recv()).await.unwrap();
    assert_eq!(dest, "site-2.j-root");
    assert_eq!(
        (id.as_deref(), ttl, pass),
        (Some("root-u"), Some(60.0), Some(true))
    );

    ask(
        &site1.aux,
        MulticastAuxRequests::new(
            "root_probe",
            vec![
                ("site-2".into(), rooted("root-2", 20.0, false)),
                ("site-3".into(), rooted("root-3", 30.0, true)),
            ],
            REQUEST_TIMEOUT,
        ),
    )
    .await
    .unwrap();
    let mut got = vec![
        within(seen.recv()).await.unwrap(),
        within(seen.recv()).await.unwrap(),
    ];
    got.sort_by(|a, b| a.1.cmp(&b.1));
    let summary: Vec<_> = got
        .into_iter()
        .map(|(_, dest, _, _, id, ttl, pass)| (dest, id, ttl, pass))
        .collect();
    assert_eq!(
        summary,
        [
            (
                "site-2.j-root".to_owned(),
                Some("root-2".to_owned()),
                Some(20.0),
                None
            ),
            (
                "site-3.j-root".to_owned(),
                Some("root-3".to_owned()),
                Some(30.0),
                Some(true)
            ),
        ]
    );
    // without the headers nothing is added
    send(site1, "site-2", "root_probe", Shareable::new())
        .await
        .unwrap();
    let (_, _, _, _, id, ttl, pass) = within(seen.recv()).await.unwrap();
    assert_eq!((id, ttl, pass), (None, None, None));
}

// ----------------------------------------------------------------------------------------------
// Directory and abort

#[actix::test]
async fn get_job_clients_swaps_atomically_and_bad_meta_keeps_the_old_directory() {
    let fed = federation("j-dir").await;
    let site1 = fed.site("site-1");
    let names = |clients: Option<Vec<fedrun_core::Client>>| -> Vec<String> {
        clients.unwrap().into_iter().map(|c| c.name).collect()
    };
    // site-5's parent is not defined: the whole meta is refused, nothing changes
    let bad = meta_of(vec![
        client_dict("site-4", None),
        client_dict("site-5", Some("missing.site-5")),
    ]);
    let err = ask(
        &site1.aux,
        GetJobClients {
            job_meta: Some(bad),
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("missing node definition"), "{err}");
    assert_eq!(names(ask(&site1.aux, GetClients).await), SITES);
    let (_, invalid) = ask(
        &site1.aux,
        ValidateTargets {
            names: vec!["site-4".into()],
        },
    )
    .await;
    assert_eq!(invalid, ["site-4"]);
    let err = ask(
        &site1.aux,
        GetJobClients {
            job_meta: Some(Value::from("not a map")),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid job meta type: expected dict but got str"
    );

    // a good meta replaces the directory entirely: stale names are gone (#21)
    let good = meta_of(vec![
        client_dict("site-1", None),
        client_dict("site-4", None),
    ]);
    let loaded = ask(
        &site1.aux,
        GetJobClients {
            job_meta: Some(good),
        },
    )
    .await
    .unwrap();
    assert_eq!(loaded.len(), 2);
    assert_eq!(
        names(ask(&site1.aux, GetClients).await),
        ["site-1", "site-4"]
    );
    let (valid, invalid) = ask(
        &site1.aux,
        ValidateTargets {
            names: vec!["site-4".into(), "site-2".into()],
        },
    )
    .await;
    assert_eq!(
        (valid, invalid),
        (vec!["site-4".to_owned()], vec!["site-2".to_owned()])
    );
    // the hierarchy became a sticker of the run: a new context sees it
    let ctx = ask(&site1.run, NewContext).await;
    let hierarchy = ctx
        .get_prop(fl_ctx_key::CLIENT_HIERARCHY)
        .expect("hierarchy sticker");
    assert!(format!("{hierarchy:?}").contains("site-4"));
}

#[actix::test]
async fn run_abort_ends_a_pending_request_with_timeout() {
    let fed = federation("j-abort").await;
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    ask(
        &fed.site("site-2").aux,
        RegisterAuxMessageHandler::new(
            "silent",
            aux_handler(move |_req| {
                let _ = started_tx.send(());
                futures::future::pending::<Result<Shareable, String>>()
            }),
        ),
    )
    .await
    .unwrap();
    let site1 = fed.site("site-1");
    let long = Duration::from_secs(60);
    let pending = site1.aux.send(SendAuxRequest::new(
        "site-2",
        "silent",
        Shareable::new(),
        long,
    ));
    let abort = async {
        within(started.recv()).await.unwrap();
        let aborted = ask(
            &site1.run,
            AbortRun {
                job_id: "j-abort".into(),
                reason: "test".into(),
            },
        )
        .await;
        assert!(aborted);
    };
    let began = Instant::now();
    let (replies, ()) = tokio::join!(within(pending), abort);
    let replies = replies.unwrap().unwrap();
    assert_eq!(rc(&replies["site-2"]), "TIMEOUT");
    assert!(began.elapsed() < long);
}
