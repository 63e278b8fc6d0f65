//! A whole federation of one job on one in-process network, driven as users drive it: the
//! server's job process (an `SJ` aux runner on `server.<job>`), the server's parent process (a
//! plain `server` cell), and three client job engines started with `ClientEngine::builder`.
//!
//! Aux requests go client → client, client → server and server → client, in every target form
//! (`server`, `server_parent`, one site, a list of sites, `@ALL`), to handlers that answer, fail,
//! panic and never answer; reply keys and return codes are asserted exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use actix::{Actor, Addr};
use fedrun::cell::{request_handler, Cell, CellHandle, CellMessage, Fqcn, Network};
use fedrun::core::constants::fl_ctx_key;
use fedrun::core::{Shareable, Value};
use fedrun::engine::{
    aux_handler, AuxConfig, AuxHandler, AuxReplies, AuxRequest, AuxRunner, AuxTargets,
    GetJobClients, MulticastAuxRequests, RegisterAuxMessageHandler, RunInfo, RunInfoConfig,
    SendAuxRequest, ShowErrors,
};
use fedrun::{ClientEngine, EngineError, EngineHandle};

/// The deadline of every wait in these tests.
const DEADLINE: Duration = Duration::from_secs(10);
/// The timeout of requests that are expected to be answered.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The timeout of requests to handlers that never answer.
const SHORT_TIMEOUT: Duration = Duration::from_millis(300);
/// How late after its timeout a timed-out request may still end (scheduling slack).
const SLACK: Duration = Duration::from_secs(2);
const SITES: [&str; 3] = ["site-1", "site-2", "site-3"];

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("no answer before the deadline")
}

/// The handlers every process of the federation serves.
fn handlers() -> Vec<(&'static str, AuxHandler)> {
    vec![
        // answers who answered, who asked and the request's x
        (
            "echo",
            aux_handler(|req: AuxRequest| async move {
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
                Ok(reply)
            }),
        ),
        (
            "fail",
            aux_handler(|_req| async move { Err::<Shareable, _>("disk full".to_owned()) }),
        ),
        (
            "panic",
            aux_handler(|_req| async move {
                if true {
                    panic!("handler bug");
                }
                Ok(Shareable::new())
            }),
        ),
        (
            "silent",
            aux_handler(|_req| futures::future::pending::<Result<Shareable, String>>()),
        ),
    ]
}

/// One job's federation.
struct Federation {
    job: String,
    server: Addr<AuxRunner>,
    server_run: Addr<RunInfo>,
    /// Kept so that the parent cell lives as long as the federation.
    _parent: CellHandle,
    clients: Vec<EngineHandle>,
}

impl Federation {
    fn client(&self, name: &str) -> &EngineHandle {
        let i = SITES.iter().position(|s| *s == name).unwrap();
        &self.clients[i]
    }

    /// A request from the server's job process.
    async fn server_sends(
        &self,
        targets: impl Into<AuxTargets>,
        topic: &str,
        request: Shareable,
        timeout: Duration,
    ) -> Result<AuxReplies, EngineError> {
        within(
            self.server
                .send(SendAuxRequest::new(targets, topic, request, timeout)),
        )
        .await
        .expect("server aux runner gone")
    }
}

async fn federation(job: &str) -> Federation {
    let network = Network::new();

    // the server's job process: SJ, job clients loaded from the same job meta as the clients'
    let sites: Vec<Value> = SITES
        .iter()
        .map(|n| Value::Map([("name", Value::from(*n))].into_iter().collect()))
        .collect();
    let meta = Value::Map([("job_clients", Value::Array(sites))].into_iter().collect());
    let server_run = RunInfo::new(RunInfoConfig::new("server", job).with_job_meta(meta)).start();
    let cell = Cell::start(Fqcn::job_cell("server", job).unwrap(), network.clone()).unwrap();
    let server = AuxRunner::new(
        AuxConfig::new("server", job, cell, server_run.clone()).with_process_type("SJ"),
    )
    .start();
    let clients = within(server.send(GetJobClients { job_meta: None }))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(clients.len(), SITES.len());
    for (topic, handler) in handlers() {
        within(server.send(RegisterAuxMessageHandler::new(topic, handler)))
            .await
            .unwrap()
            .unwrap();
    }

    // the server's parent process: a plain cell that answers every aux message
    let parent = Cell::start(Fqcn::SERVER, network.clone()).unwrap();
    within(parent.register_request_handler(
        "aux_communication",
        "*",
        request_handler(|req: CellMessage| async move {
            let mut reply = Shareable::new();
            reply.insert("who", "server_parent");
            reply.insert("topic", req.headers.topic().unwrap_or_default());
            Ok(Some(CellMessage::new(reply)))
        }),
    ))
    .await
    .unwrap();

    // three client job engines
    let mut engines = Vec::new();
    for site in SITES {
        let engine = within(
            ClientEngine::builder(site, job)
                .job_clients(&SITES)
                .start(&network),
        )
        .await
        .unwrap();
        for (topic, handler) in handlers() {
            within(engine.register_aux_message_handler(topic, handler))
                .await
                .unwrap();
        }
        engines.push(engine);
    }
    Federation {
        job: job.to_owned(),
        server,
        server_run,
        _parent: parent,
        clients: engines,
    }
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

/// Reply key → return code, sorted by key.
fn codes(replies: &AuxReplies) -> BTreeMap<&str, String> {
    replies.iter().map(|(k, v)| (k.as_str(), rc(v))).collect()
}

fn expect_codes(replies: &AuxReplies, expected: &[(&str, &str)]) {
    let expected: BTreeMap<&str, String> = expected
        .iter()
        .map(|(k, v)| (*k, (*v).to_owned()))
        .collect();
    assert_eq!(codes(replies), expected);
}

/// Checks an `echo` reply: who answered, who asked, and the x sent.
fn expect_echo(reply: &Shareable, who: &str, peer: &str, x: i64) {
    assert_eq!(rc(reply), "OK");
    assert_eq!(str_of(reply, "who"), Some(who));
    assert_eq!(str_of(reply, "peer"), Some(peer));
    assert_eq!(reply.get("x"), Some(&Value::from(x)));
}

// ----------------------------------------------------------------------------------------------
// Target forms and reply keys

#[actix::test]
async fn client_to_server_in_every_server_form_is_keyed_server() {
    let fed = federation("fed-server").await;
    let site1 = fed.client("site-1");
    for (i, targets) in [
        AuxTargets::Server,
        AuxTargets::from(""),
        AuxTargets::from("SERVER"),
        AuxTargets::Sites(vec![]),
        AuxTargets::from(vec!["Server"]),
    ]
    .into_iter()
    .enumerate()
    {
        let x = i as i64;
        let replies = within(site1.send_aux_request(targets, "echo", with_x(x), REQUEST_TIMEOUT))
            .await
            .unwrap();
        expect_codes(&replies, &[("server", "OK")]);
        expect_echo(&replies["server"], "server", "site-1", x);
    }
}

#[actix::test]
async fn server_parent_target_reaches_the_parent_cell_and_is_keyed_server_parent() {
    let fed = federation("fed-parent").await;
    let site2 = fed.client("site-2");
    let replies = within(site2.send_aux_request(
        AuxTargets::ServerParent,
        "echo",
        with_x(1),
        REQUEST_TIMEOUT,
    ))
    .await
    .unwrap();
    expect_codes(&replies, &[("server_parent", "OK")]);
    assert_eq!(
        str_of(&replies["server_parent"], "who"),
        Some("server_parent")
    );
    assert_eq!(str_of(&replies["server_parent"], "topic"), Some("echo"));

    // both server flavours in one list: two keys, no collision
    let replies = within(site2.send_aux_request(
        vec!["server", "Server_Parent"],
        "echo",
        with_x(2),
        REQUEST_TIMEOUT,
    ))
    .await
    .unwrap();
    expect_codes(&replies, &[("server", "OK"), ("server_parent", "OK")]);
    expect_echo(&replies["server"], "server", "site-2", 2);
    assert_eq!(
        str_of(&replies["server_parent"], "who"),
        Some("server_parent")
    );
}

#[actix::test]
async fn client_to_one_site_and_to_a_list_of_sites_is_keyed_by_client_name() {
    let fed = federation("fed-sites").await;
    let site1 = fed.client("site-1");
    let replies = within(site1.send_aux_request("site-3", "echo", with_x(3), REQUEST_TIMEOUT))
        .await
        .unwrap();
    expect_codes(&replies, &[("site-3", "OK")]);
    expect_echo(&replies["site-3"], "site-3", "site-1", 3);

    let replies = within(site1.send_aux_request(
        vec!["site-2", "server", "site-3"],
        "echo",
        with_x(4),
        REQUEST_TIMEOUT,
    ))
    .await
    .unwrap();
    expect_codes(
        &replies,
        &[("server", "OK"), ("site-2", "OK"), ("site-3", "OK")],
    );
    expect_echo(&replies["site-2"], "site-2", "site-1", 4);
    expect_echo(&replies["site-3"], "site-3", "site-1", 4);
    expect_echo(&replies["server"], "server", "site-1", 4);

    // names of clients are exact; an unknown one fails the whole list before anything is sent
    assert_eq!(
        within(site1.send_aux_request(
            vec!["site-2", "SITE-3"],
            "echo",
            with_x(5),
            REQUEST_TIMEOUT
        ))
        .await
        .unwrap_err(),
        EngineError::UnknownTarget("SITE-3".into())
    );
}

#[actix::test]
async fn client_all_reaches_the_server_and_every_other_client() {
    let fed = federation("fed-all").await;
    for (i, site) in SITES.iter().enumerate() {
        let x = 10 + i as i64;
        let replies = within(fed.client(site).send_aux_request(
            AuxTargets::All,
            "echo",
            with_x(x),
            REQUEST_TIMEOUT,
        ))
        .await
        .unwrap();
        let mut expected = vec![("server", "OK")];
        expected.extend(SITES.iter().filter(|s| *s != site).map(|s| (*s, "OK")));
        expect_codes(&replies, &expected);
        for (name, reply) in &replies {
            expect_echo(reply, name, site, x);
        }
    }
}

#[actix::test]
async fn server_to_one_site_a_list_and_all_is_keyed_by_target() {
    let fed = federation("fed-down").await;
    let replies = fed
        .server_sends("site-2", "echo", with_x(1), REQUEST_TIMEOUT)
        .await
        .unwrap();
    expect_codes(&replies, &[("site-2", "OK")]);
    expect_echo(&replies["site-2"], "site-2", "server", 1);

    let replies = fed
        .server_sends(vec!["site-1", "site-3"], "echo", with_x(2), REQUEST_TIMEOUT)
        .await
        .unwrap();
    expect_codes(&replies, &[("site-1", "OK"), ("site-3", "OK")]);
    expect_echo(&replies["site-1"], "site-1", "server", 2);
    expect_echo(&replies["site-3"], "site-3", "server", 2);

    // @ALL from the server job: the server target (itself) and every job client
    let replies = fed
        .server_sends(AuxTargets::All, "echo", with_x(3), REQUEST_TIMEOUT)
        .await
        .unwrap();
    expect_codes(
        &replies,
        &[
            ("server", "OK"),
            ("site-1", "OK"),
            ("site-2", "OK"),
            ("site-3", "OK"),
        ],
    );
    for (name, reply) in &replies {
        expect_echo(reply, name, "server", 3);
    }
}

#[actix::test]
async fn multicast_carries_a_different_request_to_each_target_in_both_directions() {
    let fed = federation("fed-multi").await;
    let requests = vec![
        ("server".to_owned(), with_x(100)),
        ("site-2".to_owned(), with_x(200)),
        ("site-3".to_owned(), with_x(300)),
    ];
    let replies = within(fed.client("site-1").multicast_aux_requests(
        "echo",
        requests,
        REQUEST_TIMEOUT,
    ))
    .await
    .unwrap();
    expect_codes(
        &replies,
        &[("server", "OK"), ("site-2", "OK"), ("site-3", "OK")],
    );
    expect_echo(&replies["server"], "server", "site-1", 100);
    expect_echo(&replies["site-2"], "site-2", "site-1", 200);
    expect_echo(&replies["site-3"], "site-3", "site-1", 300);

    let requests = SITES
        .iter()
        .enumerate()
        .map(|(i, s)| ((*s).to_owned(), with_x(i as i64)))
        .collect();
    let replies = within(fed.server.send(MulticastAuxRequests::new(
        "echo",
        requests,
        REQUEST_TIMEOUT,
    )))
    .await
    .unwrap()
    .unwrap();
    for (i, site) in SITES.iter().enumerate() {
        expect_echo(&replies[*site], site, "server", i as i64);
    }
}

// ----------------------------------------------------------------------------------------------
// Failing, panicking and silent handlers

#[actix::test]
async fn failing_handler_answers_handler_exception_in_every_direction() {
    let fed = federation("fed-fail").await;
    // client -> client
    let replies = within(fed.client("site-1").send_aux_request(
        "site-2",
        "fail",
        Shareable::new(),
        REQUEST_TIMEOUT,
    ))
    .await
    .unwrap();
    expect_codes(&replies, &[("site-2", "HANDLER_EXCEPTION")]);
    // client -> server
    let replies = within(fed.client("site-3").send_aux_request(
        "server",
        "fail",
        Shareable::new(),
        REQUEST_TIMEOUT,
    ))
    .await
    .unwrap();
    expect_codes(&replies, &[("server", "HANDLER_EXCEPTION")]);
    // server -> clients
    let replies = fed
        .server_sends(
            AuxTargets::Sites(SITES.map(str::to_owned).to_vec()),
            "fail",
            Shareable::new(),
            REQUEST_TIMEOUT,
        )
        .await
        .unwrap();
    expect_codes(
        &replies,
        &[
            ("site-1", "HANDLER_EXCEPTION"),
            ("site-2", "HANDLER_EXCEPTION"),
            ("site-3", "HANDLER_EXCEPTION"),
        ],
    );

    // each failure is in the answering site's error log, with the handler's text
    let report = within(fed.client("site-2").show_errors())
        .await
        .unwrap()
        .expect("errors recorded on site-2");
    let records = report.records("AuxRunner", "error");
    assert_eq!(records.len(), 2, "{report:?}");
    assert!(records.iter().all(|r| r.message.contains("disk full")));
    let report = within(fed.server_run.send(ShowErrors))
        .await
        .unwrap()
        .expect("errors recorded on the server");
    assert_eq!(report.records("AuxRunner", "error").len(), 1);
}

#[actix::test]
async fn panicking_handler_answers_handler_exception_and_the_engine_keeps_serving() {
    let fed = federation("fed-panic").await;
    // client -> client, twice: the engine survives its handler's panic
    for round in 0..2 {
        let replies = within(fed.client("site-1").send_aux_request(
            "site-2",
            "panic",
            Shareable::new(),
            REQUEST_TIMEOUT,
        ))
        .await
        .unwrap();
        expect_codes(&replies, &[("site-2", "HANDLER_EXCEPTION")]);
        let replies = within(fed.client("site-1").send_aux_request(
            "site-2",
            "echo",
            with_x(round),
            REQUEST_TIMEOUT,
        ))
        .await
        .unwrap();
        expect_echo(&replies["site-2"], "site-2", "site-1", round);
    }
    // client -> server
    let replies = within(fed.client("site-2").send_aux_request(
        AuxTargets::Server,
        "panic",
        Shareable::new(),
        REQUEST_TIMEOUT,
    ))
    .await
    .unwrap();
    expect_codes(&replies, &[("server", "HANDLER_EXCEPTION")]);
    // server -> every client; all of them still answer afterwards, and so does the server
    let replies = fed
        .server_sends(AuxTargets::All, "panic", Shareable::new(), REQUEST_TIMEOUT)
        .await
        .unwrap();
    expect_codes(
        &replies,
        &[
            ("server", "HANDLER_EXCEPTION"),
            ("site-1", "HANDLER_EXCEPTION"),
            ("site-2", "HANDLER_EXCEPTION"),
            ("site-3", "HANDLER_EXCEPTION"),
        ],
    );
    let replies = within(fed.client("site-3").send_aux_request(
        AuxTargets::All,
        "echo",
        with_x(7),
        REQUEST_TIMEOUT,
    ))
    .await
    .unwrap();
    expect_codes(
        &replies,
        &[("server", "OK"), ("site-1", "OK"), ("site-2", "OK")],
    );
    // the panicking site's engine facade still answers too
    assert_eq!(
        within(fed.client("site-2").get_run_info())
            .await
            .unwrap()
            .job_id,
        fed.job
    );
    let report = within(fed.client("site-2").show_errors())
        .await
        .unwrap()
        .expect("panics recorded");
    assert!(report
        .records("AuxRunner", "error")
        .iter()
        .any(|r| r.message.contains("handler bug")));
}

/// Sends a `silent` request with [`SHORT_TIMEOUT`] and checks it ends with `TIMEOUT` for every
/// target, neither before the timeout nor long after it.
async fn expect_timeout<F>(send: F, keys: &[&str])
where
    F: Future<Output = Result<AuxReplies, EngineError>>,
{
    let began = Instant::now();
    let replies = within(send).await.unwrap();
    let elapsed = began.elapsed();
    let expected: Vec<(&str, &str)> = keys.iter().map(|k| (*k, "TIMEOUT")).collect();
    expect_codes(&replies, &expected);
    assert!(elapsed >= SHORT_TIMEOUT, "ended after {elapsed:?}");
    assert!(elapsed < SHORT_TIMEOUT + SLACK, "ended after {elapsed:?}");
}

#[actix::test]
async fn silent_handler_times_out_within_the_request_timeout_in_every_direction() {
    let fed = federation("fed-silent").await;
    let site1 = fed.client("site-1");
    // client -> client
    expect_timeout(
        site1.send_aux_request("site-2", "silent", Shareable::new(), SHORT_TIMEOUT),
        &["site-2"],
    )
    .await;
    // client -> server
    expect_timeout(
        site1.send_aux_request("server", "silent", Shareable::new(), SHORT_TIMEOUT),
        &["server"],
    )
    .await;
    // server -> a list of clients
    expect_timeout(
        fed.server_sends(
            vec!["site-1", "site-3"],
            "silent",
            Shareable::new(),
            SHORT_TIMEOUT,
        ),
        &["site-1", "site-3"],
    )
    .await;
    // the pending handlers stall nobody: everyone still answers
    let replies =
        within(site1.send_aux_request(AuxTargets::All, "echo", with_x(9), REQUEST_TIMEOUT))
            .await
            .unwrap();
    expect_codes(
        &replies,
        &[("server", "OK"), ("site-2", "OK"), ("site-3", "OK")],
    );
}

#[actix::test]
async fn one_broadcast_reports_each_target_outcome_separately() {
    let fed = federation("fed-mixed").await;
    // the same topic means something different on each process
    within(fed.server.send(RegisterAuxMessageHandler::new(
        "mixed",
        aux_handler(|_req| async move { Ok(with_x(1)) }),
    )))
    .await
    .unwrap()
    .unwrap();
    within(fed.client("site-2").register_aux_message_handler(
        "mixed",
        aux_handler(|_req| async move { Err::<Shareable, _>("no".to_owned()) }),
    ))
    .await
    .unwrap();
    within(fed.client("site-3").register_aux_message_handler(
        "mixed",
        aux_handler(|_req| futures::future::pending::<Result<Shareable, String>>()),
    ))
    .await
    .unwrap();
    // site-1 has no `mixed` handler; the server asks everyone
    let began = Instant::now();
    let replies = fed
        .server_sends(AuxTargets::All, "mixed", Shareable::new(), SHORT_TIMEOUT)
        .await
        .unwrap();
    let elapsed = began.elapsed();
    expect_codes(
        &replies,
        &[
            ("server", "OK"),
            ("site-1", "TOPIC_UNKNOWN"),
            ("site-2", "HANDLER_EXCEPTION"),
            ("site-3", "TIMEOUT"),
        ],
    );
    assert_eq!(replies["server"].get("x"), Some(&Value::from(1)));
    assert!(elapsed < SHORT_TIMEOUT + SLACK, "ended after {elapsed:?}");
}
