//! Behaviour of cells on the in-process network: request/reply, failures as reply codes,
//! handler lookup, multi-request, fire-and-forget, abort, stop.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, Context, Handler};
use fedrun_cell::{
    header, request_handler, AbortSignal, Cell, CellCode, CellError, CellHandle, CellMessage,
    FireAndForget, Fqcn, HandlerError, IncomingRequest, MsgType, Network, Payload, PayloadEncoding,
    SendMultiRequest, SendRequest,
};
use fedrun_core::{CellReturnCode, Shareable, Value};
use tokio::sync::oneshot;

/// Every wait in these tests is bounded by this deadline.
const DEADLINE: Duration = Duration::from_secs(10);
/// A request timeout long enough never to fire in a passing test.
const LONG: Duration = Duration::from_secs(30);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("deadline exceeded")
}

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

fn fqcn(s: &str) -> Fqcn {
    Fqcn::new(s).unwrap()
}

fn job() -> Fqcn {
    fqcn("site-1.job1")
}

fn server_and_job(net: &Network) -> (CellHandle, CellHandle) {
    let server = Cell::start(Fqcn::SERVER, net.clone()).unwrap();
    let job = Cell::start(job(), net.clone()).unwrap();
    (server, job)
}

fn req(
    channel: &str,
    topic: &str,
    target: Fqcn,
    msg: CellMessage,
    timeout: Duration,
) -> SendRequest {
    SendRequest::new(channel, topic, target, msg, timeout)
}

fn echo() -> fedrun_cell::RequestHandler {
    request_handler(|req: CellMessage| async move { Ok(Some(CellMessage::new(req.payload))) })
}

fn never_answers() -> fedrun_cell::RequestHandler {
    request_handler(|_req: CellMessage| std::future::pending())
}

/// A oneshot sender usable from an `Fn` handler (completed once).
type Slot<T> = Arc<Mutex<Option<oneshot::Sender<T>>>>;

fn slot<T>() -> (Slot<T>, oneshot::Receiver<T>) {
    let (tx, rx) = oneshot::channel();
    (Arc::new(Mutex::new(Some(tx))), rx)
}

fn fire<T>(slot: &Slot<T>, value: T) {
    if let Some(tx) = slot.lock().unwrap().take() {
        let _ = tx.send(value);
    }
}

fn shareable_with(key: &str, v: impl Into<Value>) -> Shareable {
    let mut s = Shareable::new();
    s.insert(key, v);
    s
}

#[actix::test]
async fn request_reply_round_trip_carries_payload_without_copy() {
    init_log();
    let net = Network::new();
    let (server, job) = server_and_job(&net);
    let (seen, seen_rx) = slot::<Payload>();
    server
        .register_request_handler(
            "test",
            "echo",
            request_handler(move |req: CellMessage| {
                let seen = seen.clone();
                async move {
                    fire(&seen, req.payload.clone());
                    Ok(Some(CellMessage::new(req.payload)))
                }
            }),
        )
        .await
        .unwrap();

    let payload = Payload::shareable(shareable_with("weights", vec![Value::from(1.0)]));
    let original = payload.as_value().unwrap().clone();
    let reply = within(job.send_request(req(
        "test",
        "echo",
        Fqcn::SERVER,
        CellMessage::new(payload),
        LONG,
    )))
    .await
    .unwrap();

    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    let at_handler = within(seen_rx).await.unwrap();
    assert!(Arc::ptr_eq(at_handler.as_value().unwrap(), &original));
    assert!(Arc::ptr_eq(reply.payload.as_value().unwrap(), &original));
    assert_eq!(
        reply.payload.as_shareable().unwrap().get("weights"),
        Some(&Value::from(vec![Value::from(1.0)]))
    );
}

#[actix::test]
async fn reply_headers_follow_nvflare() {
    init_log();
    let net = Network::new();
    let (server, job) = server_and_job(&net);
    let (seen, seen_rx) = slot::<CellMessage>();
    server
        .register_request_handler(
            "aux_communication",
            "__sync_runner__",
            request_handler(move |req: CellMessage| {
                let seen = seen.clone();
                async move {
                    fire(&seen, req);
                    Ok(Some(
                        CellMessage::new(Shareable::new()).with_header("reply_app", "r"),
                    ))
                }
            }),
        )
        .await
        .unwrap();

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let message = CellMessage::new(Shareable::new())
        .with_header("project_name", "demo")
        .with_header(header::MSG_ROOT_ID, "root-1");
    let reply = within(
        job.send_request(
            req(
                "aux_communication",
                "__sync_runner__",
                Fqcn::SERVER,
                message,
                LONG,
            )
            .with_optional(true)
            .with_secure(true),
        ),
    )
    .await
    .unwrap();
    let request = within(seen_rx).await.unwrap();

    // Request headers, with the caller's extra headers kept.
    let q = &request.headers;
    assert_eq!(q.msg_type(), Some(MsgType::Req));
    let req_id = q.req_id().unwrap();
    assert_eq!(uuid::Uuid::parse_str(req_id).unwrap().get_version_num(), 4);
    assert_eq!(q.reply_expected(), Some(true));
    assert_eq!(q.origin(), Some("site-1.job1"));
    assert_eq!(q.from(), Some("site-1.job1"));
    assert_eq!(q.destination(), Some("server"));
    assert_eq!(q.to(), Some("server"));
    assert_eq!(q.channel(), Some("aux_communication"));
    assert_eq!(q.topic(), Some("__sync_runner__"));
    let route = q.route().unwrap();
    assert_eq!(route.len(), 1);
    assert_eq!(route[0].0, "site-1.job1");
    assert!(route[0].1 >= before);
    assert!(q.send_time().unwrap() >= before);
    assert_eq!(q.secure(), Some(true));
    assert_eq!(q.optional(), Some(true));
    assert_eq!(q.payload_encoding(), Some(PayloadEncoding::Fobs));
    assert_eq!(q.get("project_name"), Some(&Value::from("demo")));
    assert_eq!(q.msg_root_id(), Some("root-1"));

    // Reply headers.
    let r = &reply.headers;
    assert_eq!(r.msg_type(), Some(MsgType::Reply));
    assert_eq!(r.return_code(), Some(CellCode::Known(CellReturnCode::Ok)));
    assert_eq!(r.channel(), Some("aux_communication"));
    assert_eq!(r.topic(), Some("__sync_runner__"));
    assert_eq!(r.from(), Some("server"));
    assert_eq!(r.origin(), Some("server"));
    assert_eq!(r.to(), Some("site-1.job1"));
    assert_eq!(r.destination(), Some("site-1.job1"));
    assert_eq!(r.req_id(), Some(req_id));
    assert_eq!(r.optional(), Some(true));
    assert_eq!(r.secure(), Some(true));
    let route = r.route().unwrap();
    assert_eq!(route.len(), 1);
    assert_eq!(route[0].0, "server");
    assert_eq!(r.payload_encoding(), Some(PayloadEncoding::Fobs));
    assert_eq!(r.get("reply_app"), Some(&Value::from("r")));
    assert_eq!(r.error(), None);
}

#[actix::test]
async fn handler_set_return_code_is_kept_in_the_reply() {
    init_log();
    let net = Network::new();
    let (server, job) = server_and_job(&net);
    server
        .register_request_handler(
            "c",
            "t",
            request_handler(|_req: CellMessage| async move {
                let mut reply = CellMessage::empty();
                reply
                    .headers
                    .set_return_code(CellReturnCode::InvalidRequest);
                Ok(Some(reply))
            }),
        )
        .await
        .unwrap();
    let reply = within(job.send_request(req("c", "t", Fqcn::SERVER, CellMessage::empty(), LONG)))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::InvalidRequest);
    assert_eq!(
        reply.headers.payload_encoding(),
        Some(PayloadEncoding::None)
    );
    assert_eq!(reply.headers.payload_len(), Some(0));
}

#[actix::test]
async fn unknown_target_answers_target_unreachable() {
    init_log();
    let net = Network::new();
    let job = Cell::start(job(), net.clone()).unwrap();
    let reply = within(job.send_request(req(
        "c",
        "t",
        fqcn("site-2.job1"),
        CellMessage::empty(),
        LONG,
    )))
    .await
    .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::TargetUnreachable);
    assert_eq!(reply.headers.msg_type(), Some(MsgType::Reply));
    assert_eq!(reply.headers.channel(), Some("c"));
    assert_eq!(reply.headers.topic(), Some("t"));
    assert!(reply.headers.req_id().is_some());
    assert!(reply.headers.origin().is_none(), "synthesised locally");
    assert!(reply.headers.error().unwrap().contains("site-2.job1"));
}

#[actix::test]
async fn handler_slower_than_timeout_gives_timeout() {
    init_log();
    let net = Network::new();
    let (server, job) = server_and_job(&net);
    server
        .register_request_handler("c", "slow", never_answers())
        .await
        .unwrap();
    let reply = within(job.send_request(req(
        "c",
        "slow",
        Fqcn::SERVER,
        CellMessage::empty(),
        Duration::from_millis(200),
    )))
    .await
    .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Timeout);
}

#[actix::test]
async fn handler_returning_none_sends_no_reply_and_the_requester_times_out() {
    init_log();
    let net = Network::new();
    let (server, job) = server_and_job(&net);
    let (ran, ran_rx) = slot::<()>();
    server
        .register_request_handler(
            "c",
            "none",
            request_handler(move |_req: CellMessage| {
                let ran = ran.clone();
                async move {
                    fire(&ran, ());
                    Ok(None)
                }
            }),
        )
        .await
        .unwrap();
    let reply = within(job.send_request(req(
        "c",
        "none",
        Fqcn::SERVER,
        CellMessage::empty(),
        Duration::from_millis(300),
    )))
    .await
    .unwrap();
    within(ran_rx).await.unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Timeout);
}

#[actix::test]
async fn failing_handler_gives_process_exception_with_error_text() {
    init_log();
    let net = Network::new();
    let (server, job) = server_and_job(&net);
    server
        .register_request_handler(
            "c",
            "fail",
            request_handler(|_req: CellMessage| async move {
                Err(HandlerError::Other("disk full".into()))
            }),
        )
        .await
        .unwrap();
    let reply =
        within(job.send_request(req("c", "fail", Fqcn::SERVER, CellMessage::empty(), LONG)))
            .await
            .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::ProcessException);
    assert_eq!(reply.headers.error(), Some("disk full"));
    assert_eq!(reply.headers.origin(), Some("server"));
}

#[actix::test]
async fn handler_errors_map_to_nvflare_codes_on_the_wire() {
    init_log();
    let net = Network::new();
    let (server, job) = server_and_job(&net);
    let cases = [
        (
            "unavailable",
            HandlerError::ServiceUnavailable,
            CellReturnCode::ServiceUnavailable,
        ),
        (
            "session",
            HandlerError::InvalidSession,
            CellReturnCode::InvalidSession,
        ),
        (
            "request",
            HandlerError::InvalidRequest,
            CellReturnCode::InvalidRequest,
        ),
        (
            "auth",
            HandlerError::AuthenticationError,
            CellReturnCode::AuthenticationError,
        ),
        ("abort", HandlerError::AbortRun, CellReturnCode::AbortRun),
    ];
    for (topic, error, _) in &cases {
        let error = error.clone();
        server
            .register_request_handler(
                "c",
                *topic,
                request_handler(move |_req: CellMessage| {
                    let error = error.clone();
                    async move { Err(error) }
                }),
            )
            .await
            .unwrap();
    }
    for (topic, error, code) in cases {
        let reply =
            within(job.send_request(req("c", topic, Fqcn::SERVER, CellMessage::empty(), LONG)))
                .await
                .unwrap();
        assert_eq!(reply.return_code(), code, "topic {topic}");
        assert_eq!(reply.headers.error(), Some(error.to_string().as_str()));
    }
}

#[actix::test]
async fn panicking_handler_gives_process_exception_and_cell_keeps_serving() {
    init_log();
    let net = Network::new();
    let (server, job) = server_and_job(&net);
    server
        .register_request_handler(
            "c",
            "panic_in_future",
            request_handler(|_req: CellMessage| async move {
                if true {
                    panic!("boom in future");
                }
                Ok(None)
            }),
        )
        .await
        .unwrap();
    server
        .register_request_handler(
            "c",
            "panic_before_future",
            fedrun_cell::RequestHandler::Fn(Arc::new(|_req: CellMessage| panic!("boom in call"))),
        )
        .await
        .unwrap();
    server
        .register_request_handler("c", "echo", echo())
        .await
        .unwrap();

    for (topic, text) in [
        ("panic_in_future", "boom in future"),
        ("panic_before_future", "boom in call"),
    ] {
        let reply =
            within(job.send_request(req("c", topic, Fqcn::SERVER, CellMessage::empty(), LONG)))
                .await
                .unwrap();
        assert_eq!(reply.return_code(), CellReturnCode::ProcessException);
        assert!(
            reply.headers.error().unwrap().contains(text),
            "{:?}",
            reply.headers.error()
        );
    }
    assert!(server.is_running());
    let reply = within(job.send_request(req(
        "c",
        "echo",
        Fqcn::SERVER,
        CellMessage::new(Shareable::new()),
        LONG,
    )))
    .await
    .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
}

#[actix::test]
async fn no_handler_gives_process_exception_no_callback() {
    init_log();
    let net = Network::new();
    let (_server, job) = server_and_job(&net);
    let reply =
        within(job.send_request(req("c", "nobody", Fqcn::SERVER, CellMessage::empty(), LONG)))
            .await
            .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::ProcessException);
    assert_eq!(reply.headers.error(), Some("no callback"));
}

fn tagger(tag: &'static str) -> fedrun_cell::RequestHandler {
    request_handler(move |_req: CellMessage| async move {
        Ok(Some(CellMessage::empty().with_header("tag", tag)))
    })
}

#[actix::test]
async fn wildcard_lookup_order_exact_then_channel_star_then_star_star() {
    init_log();
    let net = Network::new();
    let (server, job) = server_and_job(&net);
    // Registered most general first, so that insertion order cannot explain the result.
    server
        .register_request_handler("*", "*", tagger("star_star"))
        .await
        .unwrap();
    server
        .register_request_handler("chan", "*", tagger("channel_star"))
        .await
        .unwrap();
    server
        .register_request_handler("chan", "exact", tagger("exact"))
        .await
        .unwrap();

    let tag_of = |channel: &'static str, topic: &'static str| {
        let job = job.clone();
        async move {
            let reply = within(job.send_request(req(
                channel,
                topic,
                Fqcn::SERVER,
                CellMessage::empty(),
                LONG,
            )))
            .await
            .unwrap();
            assert_eq!(reply.return_code(), CellReturnCode::Ok);
            reply
                .headers
                .get("tag")
                .and_then(Value::as_str)
                .unwrap()
                .to_owned()
        }
    };
    assert_eq!(tag_of("chan", "exact").await, "exact");
    assert_eq!(tag_of("chan", "other").await, "channel_star");
    assert_eq!(tag_of("other", "exact").await, "star_star");
}

#[actix::test]
async fn registering_the_same_key_again_replaces_the_handler() {
    init_log();
    let net = Network::new();
    let (server, job) = server_and_job(&net);
    server
        .register_request_handler("c", "t", tagger("first"))
        .await
        .unwrap();
    server
        .register_request_handler("c", "t", tagger("second"))
        .await
        .unwrap();
    let reply = within(job.send_request(req("c", "t", Fqcn::SERVER, CellMessage::empty(), LONG)))
        .await
        .unwrap();
    assert_eq!(reply.headers.get("tag"), Some(&Value::from("second")));
}

#[actix::test]
async fn empty_channel_or_topic_is_rejected() {
    init_log();
    let net = Network::new();
    let server = Cell::start(Fqcn::SERVER, net).unwrap();
    let err = server
        .register_request_handler("", "t", echo())
        .await
        .unwrap_err();
    assert!(matches!(err, CellError::InvalidHandlerKey { .. }));
    let err = server
        .register_request_handler("c", "", echo())
        .await
        .unwrap_err();
    assert!(matches!(err, CellError::InvalidHandlerKey { .. }));
}

#[actix::test]
async fn multi_request_returns_a_result_per_target() {
    init_log();
    let net = Network::new();
    let (server, job) = server_and_job(&net);
    let slow = Cell::start(fqcn("site-2.job1"), net.clone()).unwrap();
    server
        .register_request_handler("c", "t", echo())
        .await
        .unwrap();
    slow.register_request_handler("c", "t", never_answers())
        .await
        .unwrap();
    let missing = fqcn("site-3.job1");

    let replies = within(job.send_multi_request(SendMultiRequest::new(
        "c",
        "t",
        vec![
            (Fqcn::SERVER, CellMessage::new(shareable_with("n", 1))),
            (missing.clone(), CellMessage::empty()),
            (slow.fqcn().clone(), CellMessage::empty()),
        ],
        Duration::from_millis(300),
    )))
    .await
    .unwrap();

    assert_eq!(replies.len(), 3);
    let ok = &replies[&Fqcn::SERVER];
    assert_eq!(ok.return_code(), CellReturnCode::Ok);
    assert_eq!(
        ok.payload.as_shareable().unwrap().get("n"),
        Some(&Value::from(1))
    );
    assert_eq!(
        replies[&missing].return_code(),
        CellReturnCode::TargetUnreachable
    );
    assert_eq!(replies[slow.fqcn()].return_code(), CellReturnCode::Timeout);
}

#[actix::test]
async fn multi_request_with_duplicate_targets_keeps_the_last_reply() {
    init_log();
    let net = Network::new();
    let (server, job) = server_and_job(&net);
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    server
        .register_request_handler(
            "c",
            "t",
            request_handler(move |req: CellMessage| {
                counter.fetch_add(1, Ordering::SeqCst);
                async move { Ok(Some(CellMessage::new(req.payload))) }
            }),
        )
        .await
        .unwrap();
    let replies = within(job.send_multi_request(SendMultiRequest::new(
        "c",
        "t",
        vec![
            (Fqcn::SERVER, CellMessage::new(shareable_with("n", 1))),
            (Fqcn::SERVER, CellMessage::new(shareable_with("n", 2))),
        ],
        LONG,
    )))
    .await
    .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "every request is sent");
    assert_eq!(replies.len(), 1);
    assert_eq!(
        replies[&Fqcn::SERVER]
            .payload
            .as_shareable()
            .unwrap()
            .get("n"),
        Some(&Value::from(2))
    );
}

#[actix::test]
async fn fire_and_forget_is_delivered_and_reports_per_target() {
    init_log();
    let net = Network::new();
    let (server, job) = server_and_job(&net);
    let (got, got_rx) = slot::<CellMessage>();
    server
        .register_request_handler(
            "c",
            "event",
            request_handler(move |req: CellMessage| {
                let got = got.clone();
                async move {
                    fire(&got, req);
                    // A reply is discarded: nobody expects it.
                    Ok(Some(CellMessage::empty()))
                }
            }),
        )
        .await
        .unwrap();
    let missing = fqcn("site-9");
    let payload = Payload::shareable(shareable_with("e", 1));
    let original = payload.as_value().unwrap().clone();
    let codes = within(
        job.fire_and_forget(
            FireAndForget::new(
                "c",
                "event",
                vec![Fqcn::SERVER, missing.clone()],
                CellMessage::new(payload),
            )
            .with_optional(true),
        ),
    )
    .await
    .unwrap();
    assert_eq!(codes.len(), 2);
    assert_eq!(codes[&Fqcn::SERVER], CellReturnCode::Ok);
    assert_eq!(codes[&missing], CellReturnCode::TargetUnreachable);

    let delivered = within(got_rx).await.unwrap();
    assert_eq!(delivered.headers.reply_expected(), Some(false));
    assert!(delivered.headers.get(header::REQ_ID).is_none());
    assert_eq!(delivered.headers.msg_type(), Some(MsgType::Req));
    assert_eq!(delivered.headers.optional(), Some(true));
    assert!(Arc::ptr_eq(
        delivered.payload.as_value().unwrap(),
        &original
    ));
    // The requester keeps working after a discarded reply.
    server
        .register_request_handler("c", "echo", echo())
        .await
        .unwrap();
    let reply =
        within(job.send_request(req("c", "echo", Fqcn::SERVER, CellMessage::empty(), LONG)))
            .await
            .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
}

#[actix::test]
async fn abort_signal_ends_the_wait_with_timeout() {
    init_log();
    let net = Network::new();
    let (server, job) = server_and_job(&net);
    let (entered, entered_rx) = slot::<()>();
    server
        .register_request_handler(
            "c",
            "t",
            request_handler(move |_req: CellMessage| {
                let entered = entered.clone();
                async move {
                    fire(&entered, ());
                    std::future::pending().await
                }
            }),
        )
        .await
        .unwrap();
    let run = AbortSignal::new();
    let pending = {
        let job = job.clone();
        let abort = run.child();
        actix::spawn(async move {
            job.send_request(
                req(
                    "c",
                    "t",
                    Fqcn::SERVER,
                    CellMessage::empty(),
                    Duration::from_secs(3600),
                )
                .with_abort(abort),
            )
            .await
        })
    };
    within(entered_rx).await.unwrap();
    run.trigger();
    let reply = within(pending).await.unwrap().unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Timeout);
}

#[actix::test]
async fn already_triggered_abort_sends_nothing_and_answers_timeout() {
    init_log();
    let net = Network::new();
    let (server, job) = server_and_job(&net);
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    server
        .register_request_handler(
            "c",
            "t",
            request_handler(move |req: CellMessage| {
                counter.fetch_add(1, Ordering::SeqCst);
                async move { Ok(Some(CellMessage::new(req.payload))) }
            }),
        )
        .await
        .unwrap();
    let abort = AbortSignal::new();
    abort.trigger();
    let reply = within(
        job.send_request(req("c", "t", Fqcn::SERVER, CellMessage::empty(), LONG).with_abort(abort)),
    )
    .await
    .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Timeout);
    // A later request is served, and the handler ran for it alone.
    let reply = within(job.send_request(req("c", "t", Fqcn::SERVER, CellMessage::empty(), LONG)))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[actix::test]
async fn stopped_cell_is_unreachable() {
    init_log();
    let net = Network::new();
    let (server, job) = server_and_job(&net);
    server
        .register_request_handler("c", "t", echo())
        .await
        .unwrap();
    within(server.stop()).await;
    assert!(!net.contains(&Fqcn::SERVER));

    let reply = within(job.send_request(req("c", "t", Fqcn::SERVER, CellMessage::empty(), LONG)))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::TargetUnreachable);

    // The stopped cell's own handle reports it, handing the message back.
    assert!(!server.is_running());
    let msg = CellMessage::empty().with_header("k", "v");
    match server
        .send_request(req("c", "t", job.fqcn().clone(), msg, LONG))
        .await
    {
        Err(CellError::Stopped { fqcn, unsent }) => {
            assert_eq!(fqcn, Fqcn::SERVER);
            assert_eq!(unsent.unwrap().headers.get("k"), Some(&Value::from("v")));
        }
        other => panic!("expected Stopped, got {other:?}"),
    }
    // Stopping twice is fine, and the name can be used again.
    within(server.stop()).await;
    let again = Cell::start(Fqcn::SERVER, net.clone()).unwrap();
    again
        .register_request_handler("c", "t", echo())
        .await
        .unwrap();
    let reply = within(job.send_request(req("c", "t", Fqcn::SERVER, CellMessage::empty(), LONG)))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
}

#[actix::test]
async fn stopping_the_requester_answers_pending_requests_with_comm_error() {
    init_log();
    let net = Network::new();
    let (server, job) = server_and_job(&net);
    let (entered, entered_rx) = slot::<()>();
    server
        .register_request_handler(
            "c",
            "t",
            request_handler(move |_req: CellMessage| {
                let entered = entered.clone();
                async move {
                    fire(&entered, ());
                    std::future::pending().await
                }
            }),
        )
        .await
        .unwrap();
    let pending = {
        let job = job.clone();
        actix::spawn(async move {
            job.send_request(req("c", "t", Fqcn::SERVER, CellMessage::empty(), LONG))
                .await
        })
    };
    within(entered_rx).await.unwrap();
    within(job.stop()).await;
    let reply = within(pending).await.unwrap().unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::CommError);
    assert!(reply.headers.error().unwrap().contains("stopped"));
}

#[actix::test]
async fn invalid_fqcn_is_rejected() {
    for bad in [
        "",
        "site 1",
        "site-1..job",
        "site-1.job.site-1",
        "a/b",
        "ok.",
    ] {
        let err = Fqcn::new(bad).unwrap_err();
        match err {
            CellError::InvalidFqcn { fqcn, .. } => assert_eq!(fqcn, bad),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    assert!(Fqcn::job_cell("site-1", "job.1").is_err());
    // A message whose destination is not a valid name is refused by the network.
    let net = Network::new();
    let msg = CellMessage::empty().with_header(header::DESTINATION, "bad name");
    assert_eq!(net.route(msg).await, Err(CellReturnCode::InvalidTarget));
}

#[actix::test]
async fn duplicate_live_cell_name_is_rejected() {
    init_log();
    let net = Network::new();
    let _server = Cell::start(Fqcn::SERVER, net.clone()).unwrap();
    match Cell::start(Fqcn::SERVER, net.clone()) {
        Err(CellError::DuplicateFqcn(f)) => assert_eq!(f, Fqcn::SERVER),
        other => panic!("expected DuplicateFqcn, got {other:?}"),
    }
}

#[actix::test]
async fn concurrent_requests_are_matched_to_their_own_replies() {
    init_log();
    const N: usize = 100;
    let net = Network::new();
    let (server, job) = server_and_job(&net);
    // Every handler waits until all N requests are in the server at once, then answers: the
    // replies come back while all N waiters are pending.
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    server
        .register_request_handler(
            "c",
            "t",
            request_handler(move |req: CellMessage| {
                let barrier = barrier.clone();
                async move {
                    barrier.wait().await;
                    let n = req.payload.as_shareable().and_then(|s| s.get("n")).cloned();
                    Ok(Some(CellMessage::new(shareable_with("echo", n))))
                }
            }),
        )
        .await
        .unwrap();
    let requests = (0..N).map(|i| {
        let job = job.clone();
        async move {
            let reply = job
                .send_request(req(
                    "c",
                    "t",
                    Fqcn::SERVER,
                    CellMessage::new(shareable_with("n", i)),
                    LONG,
                ))
                .await
                .unwrap();
            (i, reply)
        }
    });
    let replies = within(futures::future::join_all(requests)).await;
    assert_eq!(replies.len(), N);
    for (i, reply) in replies {
        assert_eq!(reply.return_code(), CellReturnCode::Ok);
        assert_eq!(
            reply.payload.as_shareable().unwrap().get("echo"),
            Some(&Value::from(i)),
            "request {i} got another request's reply"
        );
    }
}

/// An actor used as a request handler.
struct Doubler;

impl Actor for Doubler {
    type Context = Context<Self>;
}

impl Handler<IncomingRequest> for Doubler {
    type Result = Result<Option<CellMessage>, HandlerError>;

    fn handle(
        &mut self,
        IncomingRequest(req): IncomingRequest,
        _ctx: &mut Self::Context,
    ) -> Self::Result {
        let n = req
            .payload
            .as_shareable()
            .and_then(|s| s.get("n"))
            .and_then(Value::as_i64)
            .ok_or(HandlerError::InvalidRequest)?;
        Ok(Some(CellMessage::new(shareable_with("n", n * 2))))
    }
}

#[actix::test]
async fn actor_registered_as_handler_serves_requests() {
    init_log();
    let net = Network::new();
    let (server, job) = server_and_job(&net);
    let doubler = Doubler.start();
    server
        .register_request_handler("c", "double", doubler.recipient())
        .await
        .unwrap();
    let reply = within(job.send_request(req(
        "c",
        "double",
        Fqcn::SERVER,
        CellMessage::new(shareable_with("n", 21)),
        LONG,
    )))
    .await
    .unwrap();
    assert_eq!(
        reply.payload.as_shareable().unwrap().get("n"),
        Some(&Value::from(42))
    );
    let reply =
        within(job.send_request(req("c", "double", Fqcn::SERVER, CellMessage::empty(), LONG)))
            .await
            .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::InvalidRequest);
}

#[actix::test]
async fn a_cell_can_send_requests_to_itself() {
    init_log();
    let net = Network::new();
    let server = Cell::start(Fqcn::SERVER, net).unwrap();
    server
        .register_request_handler("c", "t", echo())
        .await
        .unwrap();
    let reply = within(server.send_request(req(
        "c",
        "t",
        Fqcn::SERVER,
        CellMessage::new(shareable_with("n", 1)),
        LONG,
    )))
    .await
    .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
}
