//! The payload-resolver hook: a message marked with `fedrun.download_refs` is resolved before
//! its handler or its waiter sees it, and a failure (or a missing resolver) becomes an error
//! reply instead of a half-decoded payload.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedrun_cell::{
    header, request_handler, Cell, CellMessage, Fqcn, Network, PayloadResolver, ResolveError,
    SendRequest,
};
use fedrun_core::{CellReturnCode, Value};
use futures::future::{BoxFuture, FutureExt};

const DEADLINE: Duration = Duration::from_secs(10);
const LONG: Duration = Duration::from_secs(30);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("deadline exceeded")
}

/// Replaces the payload with `"resolved"`, or fails with `comm_error` when `fail` is set.
struct TestResolver {
    fail: bool,
}

impl PayloadResolver for TestResolver {
    fn resolve(
        &self,
        mut msg: CellMessage,
    ) -> BoxFuture<'static, Result<CellMessage, ResolveError>> {
        let fail = self.fail;
        async move {
            if fail {
                return Err(ResolveError::new(
                    CellReturnCode::CommError,
                    "producer gone",
                ));
            }
            msg.payload = fedrun_cell::Payload::value("resolved");
            Ok(msg)
        }
        .boxed()
    }
}

fn marked(payload: &str) -> CellMessage {
    CellMessage::new(fedrun_cell::Payload::value(payload))
        .with_header(header::DOWNLOAD_REFS, Value::Array(vec![]))
}

#[actix::test]
async fn marked_request_is_resolved_before_its_handler_sees_it() {
    let net = Network::new();
    let server = Cell::start(Fqcn::SERVER, net.clone()).unwrap();
    let job = Cell::start(Fqcn::job_cell("site-1", "j").unwrap(), net).unwrap();
    server
        .set_payload_resolver(Some(Arc::new(TestResolver { fail: false })))
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(None));
    let seen2 = Arc::clone(&seen);
    let echo = request_handler(move |req: CellMessage| {
        let seen = Arc::clone(&seen2);
        async move {
            *seen.lock().unwrap() = Some(req.headers.contains_key(header::DOWNLOAD_REFS));
            Ok(Some(CellMessage::new(req.payload)))
        }
    });
    server
        .register_request_handler("t", "echo", echo)
        .await
        .unwrap();
    let reply = within(job.send_request(SendRequest::new(
        "t",
        "echo",
        Fqcn::SERVER,
        marked("refs"),
        LONG,
    )))
    .await
    .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    assert_eq!(
        reply.payload.as_value().and_then(|v| v.as_str()),
        Some("resolved")
    );
    assert_eq!(
        *seen.lock().unwrap(),
        Some(false),
        "header left for the handler"
    );
}

#[actix::test]
async fn marked_request_without_resolver_is_answered_with_process_exception() {
    let net = Network::new();
    let server = Cell::start(Fqcn::SERVER, net.clone()).unwrap();
    let job = Cell::start(Fqcn::job_cell("site-1", "j").unwrap(), net).unwrap();
    let called = Arc::new(Mutex::new(false));
    let called2 = Arc::clone(&called);
    let h = request_handler(move |_req: CellMessage| {
        let called = Arc::clone(&called2);
        async move {
            *called.lock().unwrap() = true;
            Ok(Some(CellMessage::empty()))
        }
    });
    server.register_request_handler("t", "x", h).await.unwrap();
    let reply = within(job.send_request(SendRequest::new(
        "t",
        "x",
        Fqcn::SERVER,
        marked("refs"),
        LONG,
    )))
    .await
    .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::ProcessException);
    assert!(reply
        .headers
        .error()
        .is_some_and(|e| e.contains("no payload resolver")));
    assert!(
        !*called.lock().unwrap(),
        "handler saw an unresolved payload"
    );
}

#[actix::test]
async fn marked_reply_whose_resolution_fails_reaches_the_waiter_as_an_error_reply() {
    let net = Network::new();
    let server = Cell::start(Fqcn::SERVER, net.clone()).unwrap();
    let job = Cell::start(Fqcn::job_cell("site-1", "j").unwrap(), net).unwrap();
    job.set_payload_resolver(Some(Arc::new(TestResolver { fail: true })))
        .await
        .unwrap();
    let h = request_handler(|_req: CellMessage| async move { Ok(Some(marked("array refs"))) });
    server
        .register_request_handler("t", "get", h)
        .await
        .unwrap();
    let reply = within(job.send_request(SendRequest::new(
        "t",
        "get",
        Fqcn::SERVER,
        CellMessage::empty(),
        LONG,
    )))
    .await
    .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::CommError);
    assert_eq!(reply.headers.error(), Some("producer gone"));
    assert!(reply.payload.is_none(), "unresolved payload passed on");
    assert!(!reply.headers.contains_key(header::DOWNLOAD_REFS));
}
