//! The SJ side of the pinned task protocol, driven by hand-written client cells: `get_task`
//! replies for every case, `submit_update`, and the aux topics `__sync_runner__`,
//! `__job_heartbeat__`, `__task_check__`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use actix::Actor;
use fedrun_cell::{CellMessage, Network};
use fedrun_core::{AppReturnCode, PeerContext, Shareable, Value};
use fedrun_server::task_manager::{
    GetTask, StartRun, SubmitOutcome, SubmitUpdate, TaskManager, TaskManagerConfig,
};
use fedrun_server::{RunPhase, ServerJob, Task, TaskResult};

use common::{task_id, task_name, within, FakeClient, POLL};

const JOB: &str = "job-p";

async fn server(network: &Network, clients: &[&str]) -> ServerJob {
    within(
        ServerJob::builder(JOB)
            .job_clients(clients)
            .poll_interval(POLL)
            .start(network),
    )
    .await
    .unwrap()
}

fn header_keys(s: &Shareable) -> Vec<String> {
    s.headers()
        .unwrap()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect()
}

/// Posts `task` for `targets` in the background; the handle yields the wait's outcome.
fn post(
    server: &ServerJob,
    task: Task,
    targets: &[&str],
) -> tokio::task::JoinHandle<Result<Vec<TaskResult>, fedrun_server::ServerError>> {
    let ctl = server.controller("test_wf");
    let targets: Vec<String> = targets.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_local(async move {
        let abort = ctl.abort_signal();
        ctl.broadcast_and_wait(task, Some(targets), 0, Duration::ZERO, abort)
            .await
    })
}

#[actix::test]
async fn get_task_without_peer_ctx_answers_try_again() {
    let network = Network::new();
    let server = server(&network, &["site-1"]).await;
    let client = FakeClient::start(&network, "site-1", JOB).await;
    let reply = client.get_task_raw(Shareable::new()).await;
    assert_eq!(reply.return_code().as_str(), "ok");
    let reply = reply.payload.into_shareable().unwrap();
    assert_eq!(task_name(&reply), "__try_again__");
    assert_eq!(
        reply
            .header_or_none("__wait_time__")
            .and_then(Value::as_f64),
        Some(0.005)
    );
    let server_ctx = reply.peer_context().unwrap();
    assert_eq!(
        server_ctx.get("__identity_name__"),
        Some(&Value::from("server"))
    );
    assert_eq!(server_ctx.get("__run_num__"), Some(&Value::from(JOB)));
    server.stop().await;
}

#[actix::test]
async fn get_task_from_another_run_answers_end_run() {
    let network = Network::new();
    let server = server(&network, &["site-1"]).await;
    let client = FakeClient::start(&network, "site-1", JOB).await;
    let mut request = Shareable::new();
    request.set_peer_context(client.peer_ctx_for("some-other-job"));
    let reply = client.get_task_raw(request).await;
    let reply = reply.payload.into_shareable().unwrap();
    assert_eq!(task_name(&reply), "__end_run__");
    assert_eq!(task_id(&reply), "");
    assert_eq!(reply.cookie("__task_id__"), Some(&Value::from("")));
    // the run itself is untouched
    assert_eq!(server.run_phase().await.unwrap(), RunPhase::NotStarted);
    server.stop().await;
}

#[actix::test]
async fn get_task_from_a_site_that_is_not_a_job_client_answers_try_again() {
    let network = Network::new();
    let server = server(&network, &["site-1"]).await;
    within(server.task_manager().send(StartRun)).await.unwrap();
    let _posted = post(&server, Task::new("train", Shareable::new()), &["site-1"]);
    let stranger = FakeClient::start(&network, "site-9", JOB).await;
    let reply = stranger.ask(None).await;
    assert_eq!(task_name(&reply), "__try_again__");
    assert!(!server.last_seen().await.unwrap().contains_key("site-9"));
    server.stop().await;
}

#[actix::test]
async fn get_task_before_any_workflow_answers_try_again_with_min_get_task_timeout() {
    let network = Network::new();
    let server = within(
        ServerJob::builder(JOB)
            .job_clients(&["site-1"])
            .poll_interval(Duration::from_secs(2))
            .min_get_task_timeout(Duration::from_secs(90))
            .start(&network),
    )
    .await
    .unwrap();
    let client = FakeClient::start(&network, "site-1", JOB).await;
    let reply = client.ask(None).await;
    assert_eq!(task_name(&reply), "__try_again__");
    assert_eq!(
        reply.header_or_none("__wait_time__"),
        Some(&Value::from(2u64))
    );
    assert_eq!(
        reply.header_or_none("min_get_task_timeout"),
        Some(&Value::from(90u64))
    );
    server.stop().await;
}

#[actix::test]
async fn a_real_task_carries_every_header_of_the_pinned_protocol() {
    let network = Network::new();
    let server = server(&network, &["site-1"]).await;
    let client = FakeClient::start(&network, "site-1", JOB).await;
    let mut data = common::weights_result(&[("w", &[2], &[1.0, 2.0])], 1, &[]);
    data.set_header("current_round", 0);
    data.add_cookie("contribution_round", 0);
    let waiting = post(
        &server,
        Task::new("train", data).with_timeout(Duration::from_secs(60)),
        &["site-1"],
    );
    let task = client.next_task(None).await;
    assert_eq!(
        header_keys(&task),
        [
            "__content_type__",
            "current_round",
            "__cookie_jar__",
            "__task_name__",
            "__task_operator__",
            "__task_id__",
            "__msg_root_id__",
            "__msg_root_ttl__",
            "__audit_event_id__",
            "__wait_time__",
            "task_name",
            "__peer_ctx__",
        ]
    );
    let id = task_id(&task);
    assert_eq!(id.len(), 36, "a uuid: {id}");
    assert_eq!(task_name(&task), "train");
    assert_eq!(
        task.header_or_none("__task_name__"),
        Some(&Value::from("train"))
    );
    let jar = task.cookie_jar().unwrap();
    assert_eq!(jar.get("contribution_round"), Some(&Value::from(0)));
    assert_eq!(jar.get("__workflow__"), Some(&Value::from("test_wf")));
    assert_eq!(jar.get("__task_id__"), Some(&Value::from(id.as_str())));
    let op = task
        .header_or_none("__task_operator__")
        .unwrap()
        .as_map()
        .unwrap();
    assert_eq!(op.get("method"), Some(&Value::from("bcast")));
    assert_eq!(op.get("timeout"), Some(&Value::from(60u64)));
    assert_eq!(
        task.header_or_none("__msg_root_ttl__"),
        Some(&Value::from(60u64))
    );
    assert_eq!(common::dxo_array(&task, "w"), vec![1.0, 2.0]);

    // the same client asking again without answering gets the task again (it lost it)...
    let again = client.ask(None).await;
    assert_eq!(task_id(&again), id);
    assert_ne!(
        again.header_or_none("__msg_root_id__"),
        task.header_or_none("__msg_root_id__")
    );
    // ...but not when it says it already processed it
    let processed = client.ask(Some(&id)).await;
    assert_eq!(task_name(&processed), "__try_again__");

    let reply = client
        .submit(&task, common::weights_result(&[], 1, &[]))
        .await;
    assert_eq!(reply.return_code().as_str(), "ok");
    let results = within(waiting).await.unwrap().unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].client, "site-1");
    assert!(results[0].is_success());
    server.stop().await;
}

#[actix::test]
async fn task_check_says_ok_until_the_result_arrives_then_task_unknown() {
    let network = Network::new();
    let server = server(&network, &["site-1", "site-2"]).await;
    let one = FakeClient::start(&network, "site-1", JOB).await;
    let two = FakeClient::start(&network, "site-2", JOB).await;
    let waiting = post(
        &server,
        Task::new("train", Shareable::new()),
        &["site-1", "site-2"],
    );
    let task = one.next_task(None).await;
    let id = task_id(&task);
    assert_eq!(one.task_check(Some(&id)).await, "OK");
    assert_eq!(one.task_check(None).await, "BAD_REQUEST_DATA");
    assert_eq!(one.task_check(Some("no-such-task")).await, "TASK_UNKNOWN");
    one.submit(&task, Shareable::new()).await;
    // site-1 answered: nothing more expected from it, while site-2 is still expected
    assert_eq!(one.task_check(Some(&id)).await, "TASK_UNKNOWN");
    assert_eq!(two.task_check(Some(&id)).await, "OK");
    let task2 = two.next_task(None).await;
    two.submit(&task2, Shareable::new()).await;
    assert_eq!(two.task_check(Some(&id)).await, "TASK_UNKNOWN");
    assert_eq!(within(waiting).await.unwrap().unwrap().len(), 2);
    server.stop().await;
}

#[actix::test]
async fn late_and_unknown_results_are_answered_ok_and_dropped() {
    let network = Network::new();
    let server = server(&network, &["site-1"]).await;
    let client = FakeClient::start(&network, "site-1", JOB).await;
    let mut fake_task = Shareable::new();
    fake_task.add_cookie("__task_id__", "never-posted");
    let reply = client.submit(&fake_task, Shareable::new()).await;
    assert_eq!(reply.return_code().as_str(), "ok");
    assert!(reply.payload.as_shareable().is_some());

    // a result after the wait ended (timeout) is dropped too
    let waiting = post(
        &server,
        Task::new("train", Shareable::new()).with_timeout(Duration::from_millis(200)),
        &["site-1"],
    );
    let task = client.next_task(None).await;
    let outcome = within(waiting).await.unwrap();
    assert!(matches!(
        outcome,
        Err(fedrun_server::ServerError::NotEnoughResponses { got: 0, needed: 1 })
    ));
    let reply = client.submit(&task, Shareable::new()).await;
    assert_eq!(reply.return_code().as_str(), "ok");
    assert_eq!(
        client.task_check(Some(&task_id(&task))).await,
        "TASK_UNKNOWN"
    );
    server.stop().await;
}

#[actix::test]
async fn sync_runner_is_not_ready_before_a_workflow_runs_and_ok_after() {
    let network = Network::new();
    let server = server(&network, &["site-1"]).await;
    let client = FakeClient::start(&network, "site-1", JOB).await;
    let reply = client.aux("__sync_runner__", Shareable::new()).await;
    assert_eq!(reply.return_code().as_str(), "SERVER_NOT_READY");
    within(server.task_manager().send(StartRun)).await.unwrap();
    let reply = client.aux("__sync_runner__", Shareable::new()).await;
    assert_eq!(reply.return_code().as_str(), "OK");
    let ctx = reply.peer_context().unwrap();
    assert_eq!(ctx.get("__identity_name__"), Some(&Value::from("server")));
    server.stop().await;
}

#[actix::test]
async fn job_heartbeat_is_ok_and_records_the_client_as_seen() {
    let network = Network::new();
    let server = server(&network, &["site-1", "site-2"]).await;
    let client = FakeClient::start(&network, "site-1", JOB).await;
    assert!(server.last_seen().await.unwrap().is_empty());
    let before = std::time::Instant::now();
    let reply = client.aux("__job_heartbeat__", Shareable::new()).await;
    assert_eq!(reply.return_code().as_str(), "OK");
    let seen = server.last_seen().await.unwrap();
    assert_eq!(seen.len(), 1);
    assert!(seen["site-1"] >= before);
    server.stop().await;
}

#[actix::test]
async fn aux_requests_from_another_job_are_refused_with_run_mismatch() {
    let network = Network::new();
    let server = server(&network, &["site-1"]).await;
    let other = FakeClient::start(&network, "site-1", "other-job").await;
    // send to this job's server from a client that says it runs "other-job"
    let mut request = Shareable::new();
    request.set_header("__topic__", "__sync_runner__");
    let mut props = fedrun_core::Map::new();
    props.insert("__run_num__", "other-job");
    props.insert("__identity_name__", "site-1");
    request.set_peer_props(props);
    let req = fedrun_cell::SendRequest::new(
        "aux_communication",
        "__sync_runner__",
        fedrun_cell::Fqcn::job_cell("server", JOB).unwrap(),
        CellMessage::new(request),
        common::DEADLINE,
    );
    let reply = within(other.cell.send_request(req)).await.unwrap();
    let reply = reply.payload.into_shareable().unwrap();
    assert_eq!(reply.return_code().as_str(), "RUN_MISMATCH");
    server.stop().await;
}

#[actix::test]
async fn the_task_manager_drops_results_it_did_not_ask_for() {
    let mut server_ctx = PeerContext::default();
    server_ctx.set("__run_num__", "j");
    let config = TaskManagerConfig::new("j", vec!["site-1".into()], server_ctx);
    let tasks = TaskManager::new(config).start();
    let mut result = Shareable::new();
    let mut ctx = PeerContext::default();
    ctx.set("__run_num__", "j");
    ctx.set("__identity_name__", "site-1");
    result.set_peer_context(ctx.clone());
    result.add_cookie("__task_id__", "unknown");
    let outcome = within(tasks.send(SubmitUpdate {
        result: result.clone().into(),
    }))
    .await
    .unwrap();
    assert_eq!(outcome, SubmitOutcome::Dropped);
    // not a Shareable at all: try again, never a crash
    let reply = within(tasks.send(GetTask {
        request: fedrun_cell::Payload::value(Value::from(3)),
    }))
    .await
    .unwrap();
    assert_eq!(task_name(&reply), "__try_again__");
    let rc = within(tasks.send(fedrun_server::task_manager::CheckTask {
        client: "site-1".into(),
        task_id: None,
    }))
    .await
    .unwrap();
    assert_eq!(rc, AppReturnCode::BadRequestData);
}
