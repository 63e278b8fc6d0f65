//! Guarantees of NVFlare's two built-in client widgets as the engine registers them: the info
//! collector (`show_stats`, `show_errors`, `reset_errors`) and the fed-event runner (fed events
//! out to the server job and in from it), checked through the engines' mailboxes. A second
//! engine named `server` plays the server job (its cell is `server.J`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::time::Duration;

use fedrun_cell::Network;
use fedrun_core::constants::{fed_event_header as feh, fl_ctx_key};
use fedrun_core::{AppReturnCode, FlContext, Map, Shareable, Value};
use fedrun_engine::{
    add_stats, answer_info_command, aux_handler, handler_fn, set_stats, AuxRequest, AuxTargets,
    ClientEngine, EngineHandle,
};
use tokio::sync::mpsc;

const JOB: &str = "J";
const DEADLINE: Duration = Duration::from_secs(5);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("no answer before the deadline")
}

async fn start(site: &str, clients: &[&str], net: &Network) -> EngineHandle {
    let b = ClientEngine::builder(site, JOB).job_clients(clients);
    within(b.start(net)).await.unwrap()
}

async fn fire(e: &EngineHandle, event: &str) {
    let ctx = within(e.new_context()).await.unwrap();
    within(e.fire_event(event, ctx)).await.unwrap();
}

#[actix::test]
async fn get_widget_resolves_the_two_builtin_widgets_only() {
    let net = Network::new();
    let e = start("site-1", &["site-1"], &net).await;
    for id in ["info_collector", "fed_event_runner"] {
        assert!(within(e.get_widget(id)).await.unwrap().is_some(), "{id}");
    }
    assert!(within(e.get_widget("component_caller"))
        .await
        .unwrap()
        .is_none());
    assert!(within(e.info_collector()).await.is_ok());
    assert!(!within(e.fed_event_runner()).await.unwrap().is_ready());
}

#[actix::test]
async fn show_stats_returns_what_the_handlers_collected() {
    let net = Network::new();
    let e = start("site-1", &["site-1"], &net).await;
    let first = handler_fn("a", |event: &str, ctx: &mut FlContext| {
        if event == "info_collector.get_stats" {
            add_stats(
                ctx,
                "trainer",
                Map::from_iter([("round", 1), ("epochs", 5)]),
            );
        }
        Ok(())
    });
    let second = handler_fn("b", |event: &str, ctx: &mut FlContext| {
        if event == "info_collector.get_stats" {
            add_stats(ctx, "trainer", Map::from_iter([("round", 2)]));
            set_stats(ctx, "runner", Map::from_iter([("job_id", JOB)]));
        }
        Ok(())
    });
    within(e.add_handler(first)).await.unwrap();
    within(e.add_handler(second)).await.unwrap();
    let stats = within(e.show_stats()).await.unwrap();
    let trainer = stats.get("trainer").and_then(Value::as_map).unwrap();
    assert_eq!(trainer.get("round").and_then(Value::as_i64), Some(2));
    assert_eq!(trainer.get("epochs").and_then(Value::as_i64), Some(5));
    let runner = stats.get("runner").and_then(Value::as_map).unwrap();
    assert_eq!(runner.get("job_id").and_then(Value::as_str), Some(JOB));
    let reply = within(answer_info_command(&e, "show_stats")).await.unwrap();
    assert_eq!(reply, Some(Value::Map(stats)));
}

#[actix::test]
async fn log_events_show_up_in_show_errors_until_reset_errors() {
    let net = Network::new();
    let e = start("site-1", &["site-1"], &net).await;
    for message in ["first", "second"] {
        let mut ctx = within(e.new_context()).await.unwrap();
        ctx.put(fl_ctx_key::EVENT_ORIGIN, "MyComponent", true, false);
        ctx.put(fl_ctx_key::EVENT_DATA, message, true, false);
        within(e.fire_event("_error_log_available", ctx))
            .await
            .unwrap();
    }
    let report = within(e.show_errors()).await.unwrap().expect("errors");
    let lines: Vec<_> = report
        .records("MyComponent", "error")
        .iter()
        .map(|r| r.message.clone())
        .collect();
    assert_eq!(lines, ["first", "second"]);
    // The admin command answers NVFlare's shape: the latest line per group and key.
    let reply = within(answer_info_command(&e, "show_errors"))
        .await
        .unwrap()
        .unwrap();
    let line = reply
        .as_map()
        .and_then(|m| m.get("MyComponent"))
        .and_then(Value::as_map)
        .and_then(|g| g.get("error"))
        .and_then(Value::as_str)
        .unwrap();
    assert!(line.ends_with(": second"), "{line}");
    let reset = within(answer_info_command(&e, "reset_errors"))
        .await
        .unwrap();
    assert_eq!(reset, None);
    let after = within(answer_info_command(&e, "show_errors"))
        .await
        .unwrap();
    assert_eq!(after, Some(Value::from("No Errors")));
}

/// A `server` engine recording the fed events it receives.
async fn server_recording_fed_events(
    net: &Network,
) -> (EngineHandle, mpsc::UnboundedReceiver<Shareable>) {
    let server = start("server", &["site-1"], net).await;
    let (tx, rx) = mpsc::unbounded_channel();
    let handler = aux_handler(move |req: AuxRequest| {
        let _ = tx.send(req.request);
        async { Ok(Shareable::make_reply(AppReturnCode::Ok, None)) }
    });
    within(server.register_aux_message_handler("fed.event", handler))
        .await
        .unwrap();
    (server, rx)
}

fn event_type_of(s: &Shareable) -> Option<&str> {
    s.header_or_none(feh::EVENT_TYPE).and_then(Value::as_str)
}

#[actix::test]
async fn a_fed_event_goes_to_the_server_job_only_once_the_run_started() {
    let net = Network::new();
    let (_server, mut received) = server_recording_fed_events(&net).await;
    let e = start("site-1", &["site-1"], &net).await;
    let mut early = Shareable::new();
    early.insert("n", 0);
    within(e.fire_fed_event("early_event", early, None))
        .await
        .unwrap();
    fire(&e, "_start_run").await;
    let mut data = Shareable::new();
    data.insert("n", 1);
    within(e.fire_fed_event("my_event", data, None))
        .await
        .unwrap();
    // A purely local event with the same data is not sent.
    fire(&e, "local_event").await;
    let got = within(received.recv()).await.unwrap();
    // The early one was skipped: the first event the server sees is the one after the start.
    assert_eq!(event_type_of(&got), Some("my_event"));
    assert_eq!(got.get("n").and_then(Value::as_i64), Some(1));
    assert_eq!(
        got.header_or_none(feh::ORIGIN).and_then(Value::as_str),
        Some("site-1")
    );
    assert!(got
        .header_or_none(feh::TIMESTAMP)
        .and_then(Value::as_f64)
        .is_some_and(|t| t > 0.0));
    let id = got
        .header_or_none(feh::EVENT_ID)
        .and_then(Value::as_str)
        .unwrap();
    assert_eq!(id.len(), 32, "a uuid4 hex: {id}");
    assert_eq!(
        got.peer_prop("__identity_name__").and_then(Value::as_str),
        Some("site-1")
    );
}

fn incoming(event_type: Option<&str>, id: Option<&str>, timestamp: bool) -> Shareable {
    let mut s = Shareable::new();
    if let Some(t) = event_type {
        s.set_header(feh::EVENT_TYPE, t);
    }
    if let Some(id) = id {
        s.set_header(feh::EVENT_ID, id);
    }
    if timestamp {
        s.set_header(feh::TIMESTAMP, 1.5);
    }
    s
}

async fn send_fed_event(server: &EngineHandle, event: Shareable) -> String {
    let replies = server.send_aux_request(
        AuxTargets::Site("site-1".into()),
        "fed.event",
        event,
        DEADLINE,
    );
    let replies = within(replies).await.unwrap();
    replies["site-1"].return_code().as_str().to_owned()
}

#[actix::test]
async fn incoming_fed_events_are_fired_locally_once_with_the_peer_context() {
    let net = Network::new();
    let server = start("server", &["site-1"], &net).await;
    let e = start("site-1", &["site-1"], &net).await;
    // Before the run starts nobody listens on fed.event.
    let early = send_fed_event(&server, incoming(Some("remote"), Some("e0"), true)).await;
    assert_eq!(early, "TOPIC_UNKNOWN");
    fire(&e, "_start_run").await;
    let (tx, mut fired) = mpsc::unbounded_channel();
    let recorder = handler_fn("recorder", move |event: &str, ctx: &mut FlContext| {
        if event == "remote" {
            let data = ctx.get_prop(fl_ctx_key::EVENT_DATA);
            let data = data
                .as_ref()
                .and_then(Value::as_shareable)
                .cloned()
                .unwrap();
            let scope = ctx.get_prop(fl_ctx_key::EVENT_SCOPE);
            let peer = ctx
                .peer_context()
                .and_then(|p| p.get("__identity_name__").cloned());
            let _ = tx.send((data, scope, peer));
        }
        Ok(())
    });
    within(e.add_handler(recorder)).await.unwrap();
    for id in ["e1", "e1", "e2"] {
        let rc = send_fed_event(&server, incoming(Some("remote"), Some(id), true)).await;
        assert_eq!(rc, "OK");
    }
    let (first, scope, peer) = within(fired.recv()).await.unwrap();
    assert_eq!(
        first.header_or_none(feh::EVENT_ID).and_then(Value::as_str),
        Some("e1")
    );
    assert_eq!(
        first.header_or_none(feh::DIRECTION).and_then(Value::as_str),
        Some("in")
    );
    assert_eq!(scope, Some(Value::from("federation")));
    assert_eq!(peer, Some(Value::from("server")));
    // The duplicate e1 was dropped: the next event fired is e2.
    let (second, _, _) = within(fired.recv()).await.unwrap();
    assert_eq!(
        second.header_or_none(feh::EVENT_ID).and_then(Value::as_str),
        Some("e2")
    );
}

#[actix::test]
async fn malformed_incoming_fed_events_are_refused() {
    let net = Network::new();
    let server = start("server", &["site-1"], &net).await;
    let e = start("site-1", &["site-1"], &net).await;
    fire(&e, "_start_run").await;
    let no_timestamp = send_fed_event(&server, incoming(Some("x"), None, false)).await;
    assert_eq!(no_timestamp, "BAD_REQUEST_DATA");
    let no_type = send_fed_event(&server, incoming(None, None, true)).await;
    assert_eq!(no_type, "BAD_REQUEST_DATA");
    let empty_id = send_fed_event(&server, incoming(Some("x"), Some(""), true)).await;
    assert_eq!(empty_id, "BAD_REQUEST_DATA");
    // A legacy sender without an event id is accepted.
    let legacy = send_fed_event(&server, incoming(Some("x"), None, true)).await;
    assert_eq!(legacy, "OK");
}
