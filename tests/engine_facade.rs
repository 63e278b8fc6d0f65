//! The engine as users get it: `ClientEngine::builder(..).start(&network)` gives an
//! `EngineHandle`, and every engine call works the same through the handle's typed method and
//! through the raw `ClientRunManager` facade address (`engine.addr().send(msg)`).
//!
//! The actor crates test their actors directly; these tests check that the facade forwards each
//! message to the right owner and hands its reply back unchanged, on engines that talk to each
//! other over one in-process network.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{Actor, Addr};
use bytes::Bytes;
use fedrun::cell::{Cell, Fqcn, Network};
use fedrun::core::{FlContext, Shareable, Value};
use fedrun::engine::stream::{BytesConsumerFactory, BytesProducer};
use fedrun::engine::{
    aux_handler, factory, handler_fn, AbortApp, AddComponent, AddHandler, AuxConfig, AuxRequest,
    AuxRunner, AuxTargets, BuildArgs, BuildAuthorizer, BuildComponent, Component, ComponentRef,
    FireAndForgetAuxRequest, FireEvent, GetAbortSignal, GetAllComponents, GetComponent,
    GetJobClients, GetRunInfo, MulticastAuxRequests, NewContext, RegisterAuxMessageHandler,
    RegisterComponentFactory, RegisterStreamProcessing, ResetErrors, RunInfo, RunInfoConfig,
    SendAuxRequest, SetBuildAuthorizer, ShowErrors, StopEngine, StreamObjects, ValidateTargets,
};
use fedrun::{ClientEngine, EngineError, EngineHandle};
use tokio::sync::mpsc;

/// The deadline of every wait in these tests.
const DEADLINE: Duration = Duration::from_secs(5);
/// The timeout of aux requests that are expected to be answered.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const SITES: [&str; 2] = ["site-1", "site-2"];

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("no answer before the deadline")
}

async fn engine(network: &Network, site: &str, job: &str) -> EngineHandle {
    within(
        ClientEngine::builder(site, job)
            .job_clients(&SITES)
            .start(network),
    )
    .await
    .unwrap()
}

/// Two client job engines of `job` (`site-1`, `site-2`) on one network.
async fn pair(job: &str) -> (Network, EngineHandle, EngineHandle) {
    let network = Network::new();
    let a = engine(&network, "site-1", job).await;
    let b = engine(&network, "site-2", job).await;
    (network, a, b)
}

/// The job's server side: an `SJ` aux runner on `server.<job>`; its `ff` topic forwards every
/// request it gets to the returned channel.
async fn server_job(
    network: &Network,
    job: &str,
) -> (Addr<AuxRunner>, mpsc::UnboundedReceiver<Shareable>) {
    let run = RunInfo::new(RunInfoConfig::new("server", job)).start();
    let cell = Cell::start(Fqcn::job_cell("server", job).unwrap(), network.clone()).unwrap();
    let aux =
        AuxRunner::new(AuxConfig::new("server", job, cell, run).with_process_type("SJ")).start();
    let (tx, rx) = mpsc::unbounded_channel();
    let forward = aux_handler(move |req: AuxRequest| {
        let _ = tx.send(req.request);
        async move { Ok(Shareable::new()) }
    });
    within(aux.send(RegisterAuxMessageHandler::new("ff", forward)))
        .await
        .unwrap()
        .unwrap();
    (aux, rx)
}

/// Answers `{"who": <this site>, "x": <the request's x>}`.
fn echo() -> fedrun::engine::AuxHandler {
    aux_handler(|req: AuxRequest| async move {
        let mut reply = Shareable::new();
        reply.insert("who", req.ctx.identity_name());
        reply.insert("x", req.request.get("x").cloned().unwrap_or(Value::Nil));
        Ok(reply)
    })
}

fn with_x(x: i64) -> Shareable {
    let mut s = Shareable::new();
    s.insert("x", x);
    s
}

fn rc(s: &Shareable) -> String {
    s.return_code().as_str().to_owned()
}

fn str_of<'a>(s: &'a Shareable, key: &str) -> Option<&'a str> {
    s.get(key).and_then(Value::as_str)
}

/// A plain component for the registry tests.
struct Named(&'static str);
impl Component for Named {}

// ----------------------------------------------------------------------------------------------
// Run info, contexts, errors

#[actix::test]
async fn run_info_and_new_context_answer_through_facade_and_handle() {
    let network = Network::new();
    let e = engine(&network, "site-1", "job-info").await;
    assert_eq!(e.site(), "site-1");
    assert_eq!(e.job_id(), "job-info");
    assert_eq!(e.cell().fqcn().to_string(), "site-1.job-info");

    let by_handle = within(e.get_run_info()).await.unwrap();
    let by_addr = within(e.addr().send(GetRunInfo)).await.unwrap();
    assert_eq!(by_handle, by_addr);
    assert_eq!(by_handle.job_id, "job-info");
    assert_eq!(by_handle.current_task_name, "");

    for ctx in [
        within(e.new_context()).await.unwrap(),
        within(e.addr().send(NewContext)).await.unwrap(),
    ] {
        assert_eq!(ctx.identity_name(), "site-1");
        assert_eq!(ctx.job_id().as_deref(), Some("job-info"));
    }
}

#[actix::test]
async fn peer_errors_are_shown_then_reset_through_facade_and_handle() {
    let (_network, a, b) = pair("job-errors").await;
    assert!(within(b.show_errors()).await.unwrap().is_none());
    assert!(within(b.addr().send(ShowErrors)).await.unwrap().is_none());

    for reset_by_handle in [false, true] {
        let replies =
            within(a.send_aux_request("site-2", "no-such-topic", with_x(1), REQUEST_TIMEOUT))
                .await
                .unwrap();
        assert_eq!(rc(&replies["site-2"]), "TOPIC_UNKNOWN");

        let shown = within(b.show_errors())
            .await
            .unwrap()
            .expect("error recorded");
        let raw = within(b.addr().send(ShowErrors))
            .await
            .unwrap()
            .expect("error recorded");
        assert_eq!(shown, raw);
        let records = shown.records("AuxRunner", "error");
        assert_eq!(records.len(), 1, "{shown:?}");
        assert!(
            records[0].message.contains("no-such-topic"),
            "{}",
            records[0].message
        );
        assert!(
            records[0].message.contains("TOPIC_UNKNOWN"),
            "{}",
            records[0].message
        );
        // the sender's log stays clean
        assert!(within(a.show_errors()).await.unwrap().is_none());

        if reset_by_handle {
            within(b.reset_errors()).await.unwrap();
        } else {
            within(b.addr().send(ResetErrors)).await.unwrap();
        }
        assert!(within(b.show_errors()).await.unwrap().is_none());
    }
}

// ----------------------------------------------------------------------------------------------
// Components, handlers, events, runtime builds

#[actix::test]
async fn components_are_added_listed_and_duplicate_ids_refused_through_facade_and_handle() {
    let network = Network::new();
    let e = engine(&network, "site-1", "job-components").await;
    within(e.add_component("first", ComponentRef::new(Named("one"))))
        .await
        .unwrap();
    within(e.addr().send(AddComponent {
        id: "second".into(),
        component: ComponentRef::new(Named("two")),
    }))
    .await
    .unwrap()
    .unwrap();

    let err = within(e.add_component("second", ComponentRef::new(Named("again"))))
        .await
        .unwrap_err();
    assert_eq!(err, EngineError::DuplicateComponent("second".into()));
    let err = within(e.addr().send(AddComponent {
        id: "first".into(),
        component: ComponentRef::new(Named("again")),
    }))
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(err, EngineError::DuplicateComponent("first".into()));

    let one = within(e.get_component("first")).await.unwrap().unwrap();
    assert_eq!(one.downcast::<Named>().unwrap().0, "one");
    let two = within(e.addr().send(GetComponent {
        id: "second".into(),
    }))
    .await
    .unwrap()
    .unwrap();
    assert_eq!(two.downcast::<Named>().unwrap().0, "two");
    assert!(within(e.get_component("third")).await.unwrap().is_none());

    for all in [
        within(e.get_all_components()).await.unwrap(),
        within(e.addr().send(GetAllComponents)).await.unwrap(),
    ] {
        let ids: Vec<&str> = all.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(
            ids,
            ["first", "second"],
            "insertion order, duplicates not added"
        );
        assert_eq!(all[0].1.downcast::<Named>().unwrap().0, "one");
    }
}

#[actix::test]
async fn event_handlers_run_in_registration_order_through_facade_and_handle() {
    let network = Network::new();
    let e = engine(&network, "site-1", "job-events").await;
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    for (i, name) in ["h1", "h2", "h3"].into_iter().enumerate() {
        let seen = seen.clone();
        let handler = handler_fn(name, move |event: &str, ctx: &mut FlContext| {
            seen.lock().unwrap().push(format!("{name}:{event}"));
            ctx.put("last_handler", name, false, false);
            Ok(())
        });
        if i % 2 == 0 {
            within(e.add_handler(handler)).await.unwrap();
        } else {
            within(e.addr().send(AddHandler { handler })).await.unwrap();
        }
    }

    let ctx = within(e.new_context()).await.unwrap();
    let after = within(e.fire_event("ev_a", ctx)).await.unwrap();
    assert_eq!(
        after
            .get_prop("last_handler")
            .as_ref()
            .and_then(Value::as_str),
        Some("h3")
    );
    let ctx = within(e.new_context()).await.unwrap();
    within(e.addr().send(FireEvent {
        event_type: "ev_b".into(),
        ctx,
    }))
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        ["h1:ev_a", "h2:ev_a", "h3:ev_a", "h1:ev_b", "h2:ev_b", "h3:ev_b"]
    );
}

#[actix::test]
async fn build_component_is_refused_until_a_factory_and_an_authorizer_are_set() {
    let network = Network::new();
    let e = engine(&network, "site-1", "job-build").await;
    let config = serde_json::json!({"path": "my.Trainer", "args": {"lr": 0.5}});

    assert_eq!(
        within(e.build_component(config.clone())).await.unwrap_err(),
        EngineError::NoConfigurator
    );

    struct Trainer {
        lr: f64,
    }
    impl Component for Trainer {}
    let trainer = factory(|args: BuildArgs| {
        let lr = args
            .args
            .get("lr")
            .and_then(serde_json::Value::as_f64)
            .ok_or("missing lr")?;
        Ok(Trainer { lr })
    });
    within(e.addr().send(RegisterComponentFactory {
        class: "my.Trainer".into(),
        factory: trainer,
    }))
    .await
    .unwrap()
    .unwrap();

    assert_eq!(
        within(e.build_component(config.clone())).await.unwrap_err(),
        EngineError::NoBuildAuthorizer
    );
    assert_eq!(
        within(e.addr().send(BuildComponent {
            config: config.clone()
        }))
        .await
        .unwrap()
        .unwrap_err(),
        EngineError::NoBuildAuthorizer
    );

    let authorizer: BuildAuthorizer = Arc::new(|node: &serde_json::Value, _path: &str| match node
        .get("args")
        .and_then(|a| a.get("lr"))
        .and_then(serde_json::Value::as_f64)
    {
        Some(lr) if lr > 1.0 => Err("learning rate too high".to_owned()),
        _ => Ok(()),
    });
    within(e.addr().send(SetBuildAuthorizer { authorizer }))
        .await
        .unwrap();

    let built = within(e.build_component(config.clone()))
        .await
        .unwrap()
        .expect("a component");
    assert_eq!(built.downcast::<Trainer>().unwrap().lr, 0.5);
    let built = within(e.addr().send(BuildComponent { config }))
        .await
        .unwrap()
        .unwrap()
        .expect("a component");
    assert_eq!(built.downcast::<Trainer>().unwrap().lr, 0.5);

    let refused = serde_json::json!({"path": "my.Trainer", "args": {"lr": 2.0}});
    let err = within(e.build_component(refused)).await.unwrap_err();
    assert_eq!(
        err,
        EngineError::ComponentNotAuthorized {
            path: "runtime_component".into(),
            reason: "learning rate too high".into()
        }
    );
    assert!(within(e.build_component(serde_json::json!({})))
        .await
        .unwrap()
        .is_none());
    // a built component is only returned, not registered
    assert!(within(e.get_all_components()).await.unwrap().is_empty());
}

// ----------------------------------------------------------------------------------------------
// Aux messages

#[actix::test]
async fn aux_handler_registration_refuses_empty_and_duplicate_topics_through_facade_and_handle() {
    let (_network, a, b) = pair("job-register").await;
    within(b.register_aux_message_handler("echo", echo()))
        .await
        .unwrap();
    within(
        b.addr()
            .send(RegisterAuxMessageHandler::new("echo2", echo())),
    )
    .await
    .unwrap()
    .unwrap();

    assert_eq!(
        within(b.register_aux_message_handler("echo2", echo()))
            .await
            .unwrap_err(),
        EngineError::DuplicateAuxHandler("echo2".into())
    );
    assert_eq!(
        within(
            b.addr()
                .send(RegisterAuxMessageHandler::new("echo", echo()))
        )
        .await
        .unwrap()
        .unwrap_err(),
        EngineError::DuplicateAuxHandler("echo".into())
    );
    assert_eq!(
        within(b.register_aux_message_handler("", echo()))
            .await
            .unwrap_err(),
        EngineError::EmptyTopic
    );
    assert_eq!(
        within(b.addr().send(RegisterAuxMessageHandler::new("", echo())))
            .await
            .unwrap()
            .unwrap_err(),
        EngineError::EmptyTopic
    );
    // the streamer's topics are taken by the engine itself
    assert!(matches!(
        within(b.register_aux_message_handler("ObjectStreamer.Request", echo())).await,
        Err(EngineError::DuplicateAuxHandler(_))
    ));

    // both registered handlers answer
    for topic in ["echo", "echo2"] {
        let replies = within(a.send_aux_request("site-2", topic, with_x(3), REQUEST_TIMEOUT))
            .await
            .unwrap();
        assert_eq!(rc(&replies["site-2"]), "OK", "topic {topic}");
        assert_eq!(str_of(&replies["site-2"], "who"), Some("site-2"));
    }
}

#[actix::test]
async fn send_and_multicast_aux_requests_reach_peers_through_facade_and_handle() {
    let network = Network::new();
    let (_server, _ff) = server_job(&network, "job-send").await;
    let a = engine(&network, "site-1", "job-send").await;
    let b = engine(&network, "site-2", "job-send").await;
    within(b.register_aux_message_handler("echo", echo()))
        .await
        .unwrap();

    let replies = within(a.send_aux_request("site-2", "echo", with_x(1), REQUEST_TIMEOUT))
        .await
        .unwrap();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies["site-2"].get("x"), Some(&Value::from(1)));

    let replies = within(a.addr().send(SendAuxRequest::new(
        AuxTargets::Site("site-2".into()),
        "echo",
        with_x(2),
        REQUEST_TIMEOUT,
    )))
    .await
    .unwrap()
    .unwrap();
    assert_eq!(replies["site-2"].get("x"), Some(&Value::from(2)));
    assert_eq!(str_of(&replies["site-2"], "who"), Some("site-2"));

    // unknown targets fail before anything is sent, on both paths
    assert_eq!(
        within(a.send_aux_request("site-9", "echo", with_x(0), REQUEST_TIMEOUT))
            .await
            .unwrap_err(),
        EngineError::UnknownTarget("site-9".into())
    );
    assert_eq!(
        within(a.addr().send(SendAuxRequest::new(
            "site-9",
            "echo",
            with_x(0),
            REQUEST_TIMEOUT
        )))
        .await
        .unwrap()
        .unwrap_err(),
        EngineError::UnknownTarget("site-9".into())
    );

    // multicast: a request per target; the server has no `echo` handler
    let requests = vec![
        ("site-2".to_owned(), with_x(10)),
        ("server".to_owned(), with_x(20)),
    ];
    let by_handle = within(a.multicast_aux_requests("echo", requests.clone(), REQUEST_TIMEOUT))
        .await
        .unwrap();
    let by_addr = within(a.addr().send(MulticastAuxRequests::new(
        "echo",
        requests,
        REQUEST_TIMEOUT,
    )))
    .await
    .unwrap()
    .unwrap();
    for replies in [by_handle, by_addr] {
        let mut keys: Vec<&str> = replies.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["server", "site-2"]);
        assert_eq!(replies["site-2"].get("x"), Some(&Value::from(10)));
        assert_eq!(rc(&replies["server"]), "TOPIC_UNKNOWN");
    }
}

#[actix::test]
async fn fire_and_forget_aux_requests_reach_the_job_server_through_facade_and_handle() {
    let network = Network::new();
    let (_server, mut received) = server_job(&network, "job-ff").await;
    let a = engine(&network, "site-1", "job-ff").await;

    within(a.fire_and_forget_aux_request("ff", with_x(1)))
        .await
        .unwrap();
    let got = within(received.recv()).await.unwrap();
    assert_eq!(got.get("x"), Some(&Value::from(1)));

    within(a.addr().send(FireAndForgetAuxRequest::new("ff", with_x(2))))
        .await
        .unwrap()
        .unwrap();
    let got = within(received.recv()).await.unwrap();
    assert_eq!(got.get("x"), Some(&Value::from(2)));
    // the peer context travelled with it
    assert_eq!(
        got.peer_prop("__identity_name__").and_then(Value::as_str),
        Some("site-1")
    );

    assert_eq!(
        within(a.fire_and_forget_aux_request("", with_x(3)))
            .await
            .unwrap_err(),
        EngineError::EmptyTopic
    );
}

#[actix::test]
async fn job_clients_and_target_validation_answer_through_facade_and_handle() {
    let network = Network::new();
    let e = engine(&network, "site-1", "job-clients").await;
    let names = |clients: Vec<fedrun::core::Client>| -> Vec<String> {
        clients.into_iter().map(|c| c.name).collect()
    };
    assert_eq!(names(within(e.get_job_clients()).await.unwrap()), SITES);
    assert_eq!(
        names(
            within(e.addr().send(GetJobClients { job_meta: None }))
                .await
                .unwrap()
                .unwrap()
        ),
        SITES
    );

    let input: Vec<String> = [
        "server",
        "SERVER",
        "site-2",
        "site-9",
        "@ALL",
        "server_parent",
    ]
    .map(str::to_owned)
    .to_vec();
    let expected = (
        vec!["server", "SERVER", "site-2", "server_parent"],
        vec!["site-9", "@ALL"],
    );
    let (valid, invalid) = within(e.validate_targets(input.clone())).await.unwrap();
    assert_eq!(
        (valid, invalid),
        (to_strings(&expected.0), to_strings(&expected.1))
    );
    let (valid, invalid) = within(e.addr().send(ValidateTargets { names: input }))
        .await
        .unwrap();
    assert_eq!(
        (valid, invalid),
        (to_strings(&expected.0), to_strings(&expected.1))
    );

    // an engine without a job meta has no job clients: @ALL cannot be resolved
    let bare = within(ClientEngine::builder("site-3", "job-clients").start(&network))
        .await
        .unwrap();
    assert_eq!(
        within(bare.send_aux_request(AuxTargets::All, "echo", Shareable::new(), REQUEST_TIMEOUT))
            .await
            .unwrap_err(),
        EngineError::JobClientsNotLoaded
    );
    let (valid, invalid) = within(bare.validate_targets(vec!["site-1".into(), "server".into()]))
        .await
        .unwrap();
    assert_eq!(valid, ["server"]);
    assert_eq!(invalid, ["site-1"]);
}

fn to_strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

// ----------------------------------------------------------------------------------------------
// Abort

#[actix::test]
async fn abort_app_of_another_job_is_refused_and_triggers_nothing() {
    let network = Network::new();
    let e = engine(&network, "site-1", "job-keep").await;
    let signal = within(e.abort_signal()).await.unwrap();
    assert!(!within(e.abort_app("job-other")).await.unwrap());
    assert!(!within(e.addr().send(AbortApp {
        job_id: "job-other".into()
    }))
    .await
    .unwrap());
    assert!(!signal.is_triggered());
    // the raw GetAbortSignal gives the same run signal
    let raw = within(e.addr().send(GetAbortSignal)).await.unwrap();
    assert!(!raw.is_triggered());
}

/// Aborts `site-1` of a fresh pair (through the handle or the facade address) while it waits on
/// a request that `site-2` never answers; the request must end with `TIMEOUT` long before its own
/// timeout.
async fn abort_ends_pending_request(job: &str, by_handle: bool) {
    let (_network, a, b) = pair(job).await;
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    within(b.register_aux_message_handler(
        "silent",
        aux_handler(move |_req| {
            let _ = started_tx.send(());
            futures::future::pending::<Result<Shareable, String>>()
        }),
    ))
    .await
    .unwrap();
    let signal = within(a.abort_signal()).await.unwrap();
    let long = Duration::from_secs(60);
    let began = Instant::now();
    let pending = a.send_aux_request("site-2", "silent", Shareable::new(), long);
    let abort = async {
        within(started.recv()).await.unwrap();
        let aborted = if by_handle {
            within(a.abort_app(job)).await.unwrap()
        } else {
            within(a.addr().send(AbortApp { job_id: job.into() }))
                .await
                .unwrap()
        };
        assert!(aborted);
    };
    let (replies, ()) = tokio::join!(within(pending), abort);
    let replies = replies.unwrap();
    assert_eq!(rc(&replies["site-2"]), "TIMEOUT");
    assert!(began.elapsed() < long);
    assert!(signal.is_triggered());
    // the other site's run is untouched
    assert!(!within(b.abort_signal()).await.unwrap().is_triggered());
}

#[actix::test]
async fn abort_app_of_own_job_by_handle_triggers_the_signal_and_ends_a_pending_request_with_timeout(
) {
    abort_ends_pending_request("job-abort-h", true).await;
}

#[actix::test]
async fn abort_app_of_own_job_by_facade_triggers_the_signal_and_ends_a_pending_request_with_timeout(
) {
    abort_ends_pending_request("job-abort-f", false).await;
}

// ----------------------------------------------------------------------------------------------
// Streaming

#[actix::test]
async fn bytes_stream_reaches_the_registered_consumer_through_facade_and_handle() {
    let (_network, a, b) = pair("job-stream").await;
    let (by_handle, mut got_by_handle) = BytesConsumerFactory::in_memory();
    within(b.register_stream_processing("models", "global", by_handle))
        .await
        .unwrap();
    let (by_addr, mut got_by_addr) = BytesConsumerFactory::in_memory();
    within(
        b.addr()
            .send(RegisterStreamProcessing::new("models", "local", by_addr)),
    )
    .await
    .unwrap();

    let data: Bytes = (0..1000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    let producer = BytesProducer::from_bytes(data.clone()).with_chunk_size(300);
    let outcome = within(a.stream_objects("models", "global", "site-2", producer))
        .await
        .unwrap();
    assert!(outcome.rc.is_ok(), "{outcome:?}");
    assert!(
        outcome.pieces >= 4,
        "1000 bytes in 300-byte chunks: {outcome:?}"
    );
    let received = within(got_by_handle.recv()).await.unwrap();
    assert!(received.rc.is_ok());
    assert_eq!(received.size, 1000);
    assert_eq!(received.data.as_ref(), Some(&data));

    let producer = BytesProducer::from_bytes(data.clone()).with_chunk_size(512);
    let outcome = within(
        a.addr()
            .send(StreamObjects::new("models", "local", "site-2", producer)),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(outcome.rc.is_ok(), "{outcome:?}");
    let received = within(got_by_addr.recv()).await.unwrap();
    assert_eq!(received.data.as_ref(), Some(&data));
    // each registration got only its own (channel, topic)
    assert!(got_by_handle.try_recv().is_err());

    // an unknown target fails before anything is sent
    let producer = BytesProducer::from_bytes(data);
    assert_eq!(
        within(a.stream_objects("models", "global", "site-9", producer))
            .await
            .unwrap_err(),
        EngineError::UnknownTarget("site-9".into())
    );
}

// ----------------------------------------------------------------------------------------------
// Stopping

#[actix::test]
async fn stopped_engine_answers_actor_gone_and_peers_get_error() {
    let (_network, a, b) = pair("job-stop").await;
    within(b.register_aux_message_handler("echo", echo()))
        .await
        .unwrap();
    let replies = within(a.send_aux_request("site-2", "echo", with_x(1), REQUEST_TIMEOUT))
        .await
        .unwrap();
    assert_eq!(rc(&replies["site-2"]), "OK");

    within(b.stop()).await;
    let gone = EngineError::ActorGone {
        actor: "ClientRunManager",
    };
    assert_eq!(within(b.get_run_info()).await.unwrap_err(), gone);
    assert_eq!(within(b.show_errors()).await.unwrap_err(), gone);
    assert_eq!(
        within(b.register_aux_message_handler("late", echo()))
            .await
            .unwrap_err(),
        gone
    );
    assert!(within(b.addr().send(GetRunInfo)).await.is_err());
    // stopping twice is harmless
    within(b.stop()).await;

    // the peer's request to the stopped site ends at once with ERROR (its cell is gone)
    let began = Instant::now();
    let replies = within(a.send_aux_request("site-2", "echo", with_x(2), REQUEST_TIMEOUT))
        .await
        .unwrap();
    assert_eq!(rc(&replies["site-2"]), "ERROR");
    assert!(began.elapsed() < REQUEST_TIMEOUT);
    // and the peer itself keeps working
    assert_eq!(within(a.get_run_info()).await.unwrap().job_id, "job-stop");
}

#[actix::test]
async fn stop_engine_message_closes_the_facade() {
    let (_network, a, b) = pair("job-stop-msg").await;
    within(b.addr().send(StopEngine)).await.unwrap();
    let gone = EngineError::ActorGone {
        actor: "ClientRunManager",
    };
    assert_eq!(within(b.get_run_info()).await.unwrap_err(), gone);
    assert!(within(b.addr().send(NewContext)).await.is_err());
    assert_eq!(
        within(b.fire_and_forget_aux_request("ff", Shareable::new()))
            .await
            .unwrap_err(),
        gone
    );
    // the other engine is independent
    assert_eq!(
        within(a.get_run_info()).await.unwrap().job_id,
        "job-stop-msg"
    );
}

/// Fires its channel when dropped: tells the test that whatever owned it is gone.
struct DropSignal(Option<tokio::sync::oneshot::Sender<()>>);
impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

#[actix::test]
async fn stop_engine_message_stops_the_aux_runner_and_peers_get_service_unavailable() {
    let (_network, a, b) = pair("job-stop-aux").await;
    let (dropped_tx, dropped) = tokio::sync::oneshot::channel();
    let guard = Arc::new(DropSignal(Some(dropped_tx)));
    within(b.register_aux_message_handler(
        "echo",
        aux_handler(move |req: AuxRequest| {
            let _keep = guard.clone();
            async move { Ok(req.request) }
        }),
    ))
    .await
    .unwrap();
    let replies = within(a.send_aux_request("site-2", "echo", with_x(1), REQUEST_TIMEOUT))
        .await
        .unwrap();
    assert_eq!(rc(&replies["site-2"]), "OK");

    within(b.addr().send(StopEngine)).await.unwrap();
    // the aux runner owned the handler: it is dropped once the runner has stopped
    within(dropped).await.unwrap();
    // b's cell is still up (the handle holds it), but nobody serves its aux channel
    let replies = within(a.send_aux_request("site-2", "echo", with_x(2), REQUEST_TIMEOUT))
        .await
        .unwrap();
    assert_eq!(rc(&replies["site-2"]), "service_unavailable");
}
