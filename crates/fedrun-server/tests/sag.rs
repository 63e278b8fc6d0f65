//! Scatter-and-gather rounds driven by hand-written client jobs: exact FedAvg, metrics and
//! events, failing and missing clients, and the end of the run.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use fedrun_cell::Network;
use fedrun_core::{AppReturnCode, NdArray, Shareable, Value};
use fedrun_server::{
    Controller, FedAvg, ModelWeights, NpyPersistor, RunPhase, SagConfig, ScatterAndGather,
    ServerError, ServerJob, Workflow, WorkflowEvent, WorkflowOutcome,
};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use common::{task_id, task_name, temp_dir, weights_result, within, FakeClient, POLL};

const JOB: &str = "job-s";

async fn server_with_events(
    network: &Network,
    clients: &[&str],
) -> (ServerJob, mpsc::UnboundedReceiver<WorkflowEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let server = within(
        ServerJob::builder(JOB)
            .job_clients(clients)
            .poll_interval(POLL)
            .events(tx)
            .start(network),
    )
    .await
    .unwrap();
    (server, rx)
}

fn initial_model() -> ModelWeights {
    let mut m = ModelWeights::new();
    m.insert(
        "w".into(),
        NdArray::from_f32(&[2, 2], &[0.0, 0.0, 0.0, 0.0]).unwrap(),
    );
    m.insert("b".into(), NdArray::from_f32(&[2], &[0.0, 0.0]).unwrap());
    m
}

fn sag(config: SagConfig, dir: &std::path::Path) -> ScatterAndGather {
    let persistor = NpyPersistor::new(dir).with_initial_weights(initial_model());
    ScatterAndGather::new(config, Arc::new(FedAvg::default()), Arc::new(persistor))
}

/// What a fake client answers to one task.
#[derive(Clone)]
enum Answer {
    Weights {
        w: [f32; 4],
        b: [f32; 2],
        steps: i64,
        loss: f64,
    },
    Fail,
}

/// Runs a fake client in the background: answers every task with `answers[round]` (rounds past
/// the list get the last answer), until `__end_run__`. Yields the tasks it received.
fn run_client(client: FakeClient, answers: Vec<Answer>) -> tokio::task::JoinHandle<Vec<Shareable>> {
    tokio::task::spawn_local(async move {
        let mut tasks = Vec::new();
        let mut last: Option<String> = None;
        loop {
            let task = client.next_task(last.as_deref()).await;
            if task_name(&task) == "__end_run__" {
                return tasks;
            }
            let round = task
                .header_or_none("current_round")
                .and_then(Value::as_u64)
                .unwrap() as usize;
            let answer = answers.get(round).or(answers.last()).cloned().unwrap();
            let result = match answer {
                Answer::Weights { w, b, steps, loss } => weights_result(
                    &[("w", &[2, 2], &w), ("b", &[2], &b)],
                    steps,
                    &[("loss", Value::from(loss))],
                ),
                Answer::Fail => Shareable::make_reply(AppReturnCode::ExecutionException, None),
            };
            let reply = client.submit(&task, result).await;
            assert_eq!(reply.return_code().as_str(), "ok");
            last = Some(task_id(&task));
            tasks.push(task);
        }
    })
}

#[actix::test]
async fn a_sag_round_with_three_clients_gives_the_exact_weighted_fedavg() {
    let network = Network::new();
    let sites = ["site-1", "site-2", "site-3"];
    let (server, mut events) = server_with_events(&network, &sites).await;
    let answers = [
        Answer::Weights {
            w: [8.0, 16.0, 0.0, -8.0],
            b: [1.0, 2.0],
            steps: 1,
            loss: 0.5,
        },
        Answer::Weights {
            w: [0.0, 4.0, 8.0, 12.0],
            b: [3.0, 5.0],
            steps: 2,
            loss: 1.0,
        },
        Answer::Weights {
            w: [16.0, 0.0, 8.0, 4.0],
            b: [1.0, 1.0],
            steps: 5,
            loss: 0.25,
        },
    ];
    let mut clients = Vec::new();
    for (site, answer) in sites.iter().zip(answers) {
        let c = FakeClient::start(&network, site, JOB).await;
        clients.push(run_client(c, vec![answer]));
    }
    let dir = temp_dir("fedavg");
    let mut workflow = sag(SagConfig::new(3, 1), &dir).with_id("sag");
    let outcome = within(server.run_workflow(&mut workflow)).await.unwrap();

    // (1*A + 2*B + 5*C) / 8, exactly representable
    let model = outcome.model.as_ref().unwrap();
    assert_eq!(model["w"].to_f32_vec().unwrap(), vec![11.0, 3.0, 7.0, 4.5]);
    assert_eq!(model["w"].shape(), &[2, 2]);
    assert_eq!(model["b"].to_f32_vec().unwrap(), vec![1.5, 2.125]);
    assert_eq!(outcome.workflow, "sag");
    assert_eq!(outcome.rounds.len(), 1);
    let round = &outcome.rounds[0];
    assert_eq!(round.round, 0);
    assert_eq!(round.clients, ["site-1", "site-2", "site-3"]);
    assert!(round.failed_clients.is_empty());
    // (0.5*1 + 1.0*2 + 0.25*5) / 8
    assert_eq!(round.metrics["loss"], 0.46875);
    assert_eq!(round.metrics.len(), 1);

    // every client got the initial model with the round headers, then __end_run__
    for client in clients {
        let tasks = within(client).await.unwrap();
        assert_eq!(tasks.len(), 1);
        let task = &tasks[0];
        assert_eq!(
            task.header_or_none("current_round"),
            Some(&Value::from(0u32))
        );
        assert_eq!(task.header_or_none("num_rounds"), Some(&Value::from(1u32)));
        assert_eq!(task.cookie("contribution_round"), Some(&Value::from(0u32)));
        assert_eq!(task.cookie("__workflow__"), Some(&Value::from("sag")));
        assert_eq!(common::dxo_array(task, "w"), vec![0.0; 4]);
        let op = task
            .header_or_none("__task_operator__")
            .and_then(Value::as_map)
            .unwrap();
        assert_eq!(op.get("aggregator"), Some(&Value::from("aggregator")));
    }

    // the final model was persisted and reloads exactly
    let saved = fedrun_server::load_npy_model(&dir).unwrap();
    assert_eq!(&saved, model);

    // observers saw the round
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    assert!(matches!(&seen[0], WorkflowEvent::WorkflowStarted { workflow } if workflow == "sag"));
    assert!(matches!(
        &seen[1],
        WorkflowEvent::RoundStarted {
            round: 0,
            end_round: 1,
            targets: 3,
            ..
        }
    ));
    let received = seen
        .iter()
        .filter(|e| matches!(e, WorkflowEvent::ResultReceived { success: true, .. }))
        .count();
    assert_eq!(received, 3);
    assert!(seen.iter().any(|e| matches!(
        e,
        WorkflowEvent::RoundCompleted { metrics, .. } if metrics == round
    )));
    assert!(matches!(
        seen.last(),
        Some(WorkflowEvent::WorkflowFinished { error: None, .. })
    ));
    server.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[actix::test]
async fn rounds_chain_the_global_model_from_the_start_round() {
    let network = Network::new();
    let sites = ["site-1", "site-2"];
    let (server, _events) = server_with_events(&network, &sites).await;
    // both clients answer round r with w = r+1 everywhere: the model follows the last round
    let answers: Vec<Answer> = (0..5)
        .map(|r| Answer::Weights {
            w: [r as f32 + 1.0; 4],
            b: [0.0; 2],
            steps: 1,
            loss: f64::from(r),
        })
        .collect();
    let mut clients = Vec::new();
    for site in sites {
        let c = FakeClient::start(&network, site, JOB).await;
        clients.push(run_client(c, answers.clone()));
    }
    let dir = temp_dir("chain");
    let config = SagConfig::new(2, 2).with_start_round(2);
    let mut workflow = sag(config, &dir);
    let outcome = within(server.run_workflow(&mut workflow)).await.unwrap();
    let rounds: Vec<u32> = outcome.rounds.iter().map(|r| r.round).collect();
    assert_eq!(rounds, [2, 3]);
    assert_eq!(
        outcome.model.unwrap()["w"].to_f32_vec().unwrap(),
        vec![4.0; 4]
    );
    for client in clients {
        let tasks = within(client).await.unwrap();
        assert_eq!(tasks.len(), 2);
        // round 3 starts from round 2's aggregate
        assert_eq!(common::dxo_array(&tasks[1], "w"), vec![3.0; 4]);
        assert_eq!(
            tasks[1].header_or_none("num_rounds"),
            Some(&Value::from(2u32))
        );
    }
    server.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[actix::test]
async fn min_clients_not_met_within_the_task_timeout_fails_the_round_clearly() {
    let network = Network::new();
    let sites = ["site-1", "site-2", "site-3"];
    let (server, mut events) = server_with_events(&network, &sites).await;
    // only site-1 runs; site-2 and site-3 never ask for tasks
    let one = FakeClient::start(&network, "site-1", JOB).await;
    let client = run_client(
        one,
        vec![Answer::Weights {
            w: [1.0; 4],
            b: [1.0; 2],
            steps: 1,
            loss: 0.0,
        }],
    );
    let dir = temp_dir("minclients");
    let config = SagConfig::new(2, 3).with_train_timeout(Duration::from_millis(300));
    let mut workflow = sag(config, &dir);
    let err = within(server.run_workflow(&mut workflow))
        .await
        .unwrap_err();
    match &err {
        ServerError::RoundFailed { round: 0, source } => assert!(
            matches!(
                **source,
                ServerError::NotEnoughResponses { got: 1, needed: 2 }
            ),
            "{source}"
        ),
        other => panic!("unexpected {other}"),
    }
    assert_eq!(
        err.to_string(),
        "round 0 failed: not enough successful responses: got 1, needed 2"
    );
    // no partial model was saved, and the run ended anyway
    assert!(!dir.exists());
    assert_eq!(server.run_phase().await.unwrap(), RunPhase::Ended);
    assert_eq!(within(client).await.unwrap().len(), 1);
    let mut last = None;
    while let Ok(e) = events.try_recv() {
        last = Some(e);
    }
    assert!(matches!(
        last,
        Some(WorkflowEvent::WorkflowFinished { error: Some(e), .. }) if e.contains("got 1, needed 2")
    ));
    server.stop().await;
}

#[actix::test]
async fn a_failing_client_is_ignored_when_min_clients_still_succeed() {
    let network = Network::new();
    let sites = ["site-1", "site-2", "site-3"];
    let (server, mut events) = server_with_events(&network, &sites).await;
    let answers = [
        Answer::Weights {
            w: [2.0; 4],
            b: [2.0; 2],
            steps: 1,
            loss: 1.0,
        },
        Answer::Weights {
            w: [4.0; 4],
            b: [4.0; 2],
            steps: 3,
            loss: 2.0,
        },
        Answer::Fail,
    ];
    let mut clients = Vec::new();
    for (site, answer) in sites.iter().zip(answers) {
        let c = FakeClient::start(&network, site, JOB).await;
        clients.push(run_client(c, vec![answer]));
    }
    let dir = temp_dir("failing");
    let mut workflow = sag(SagConfig::new(2, 1), &dir);
    let outcome = within(server.run_workflow(&mut workflow)).await.unwrap();
    let round = &outcome.rounds[0];
    assert_eq!(round.clients, ["site-1", "site-2"]);
    assert_eq!(round.failed_clients, ["site-3"]);
    assert_eq!(round.metrics["loss"], 1.75);
    let model = outcome.model.unwrap();
    assert_eq!(model["w"].to_f32_vec().unwrap(), vec![3.5; 4]);
    assert_eq!(model["b"].to_f32_vec().unwrap(), vec![3.5; 2]);
    for client in clients {
        within(client).await.unwrap();
    }
    let mut failures = 0;
    while let Ok(e) = events.try_recv() {
        if let WorkflowEvent::ResultReceived {
            success: false,
            client,
            ..
        } = e
        {
            assert_eq!(client, "site-3");
            failures += 1;
        }
    }
    assert_eq!(failures, 1);
    server.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[actix::test]
async fn too_few_successes_after_everyone_answered_fail_without_waiting_for_the_timeout() {
    let network = Network::new();
    let sites = ["site-1", "site-2"];
    let (server, _events) = server_with_events(&network, &sites).await;
    let ok = FakeClient::start(&network, "site-1", JOB).await;
    let bad = FakeClient::start(&network, "site-2", JOB).await;
    let a = run_client(
        ok,
        vec![Answer::Weights {
            w: [1.0; 4],
            b: [1.0; 2],
            steps: 1,
            loss: 0.0,
        }],
    );
    let b = run_client(bad, vec![Answer::Fail]);
    let dir = temp_dir("toofew");
    // no task timeout: only "everyone answered" can end the wait
    let mut workflow = sag(SagConfig::new(2, 1), &dir);
    let err = within(server.run_workflow(&mut workflow))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            ServerError::RoundFailed { round: 0, source }
                if matches!(**source, ServerError::NotEnoughResponses { got: 1, needed: 2 })
        ),
        "{err}"
    );
    within(a).await.unwrap();
    within(b).await.unwrap();
    server.stop().await;
}

/// A workflow that ends at once.
struct Nothing;

impl Workflow for Nothing {
    fn name(&self) -> &str {
        "nothing"
    }
    fn run<'a>(
        &'a mut self,
        _ctl: Controller,
    ) -> BoxFuture<'a, Result<WorkflowOutcome, ServerError>> {
        Box::pin(async { Ok(WorkflowOutcome::new("nothing")) })
    }
}

#[actix::test]
async fn end_of_run_tells_every_client_job_and_answers_later_get_task_with_end_run() {
    let network = Network::new();
    let sites = ["site-1", "site-2"];
    let (server, _events) = server_with_events(&network, &sites).await;
    let mut one = FakeClient::start(&network, "site-1", JOB).await;
    let mut two = FakeClient::start(&network, "site-2", JOB).await;
    let outcome = within(server.run_workflow(&mut Nothing)).await.unwrap();
    assert_eq!(outcome.workflow, "nothing");
    for client in [&mut one, &mut two] {
        let notice = client.end_run_notice().await;
        assert_eq!(
            notice.header_or_none("__topic__"),
            Some(&Value::from("__end_run__"))
        );
        assert_eq!(
            notice.peer_prop("__identity_name__"),
            Some(&Value::from("server"))
        );
        assert_eq!(notice.peer_prop("__run_num__"), Some(&Value::from(JOB)));
        let reply = client.ask(None).await;
        assert_eq!(task_name(&reply), "__end_run__");
        assert_eq!(task_id(&reply), "");
        assert_eq!(reply.cookie("__task_id__"), Some(&Value::from("")));
    }
    // ending again sends nothing more
    server.end_run().await.unwrap();
    assert!(within(server.controller("late").broadcast_and_wait(
        fedrun_server::Task::new("train", Shareable::new()),
        None,
        0,
        Duration::ZERO,
        server.controller("late").abort_signal(),
    ))
    .await
    .is_err_and(|e| matches!(e, ServerError::RunEnded)));
    server.stop().await;
}

/// A workflow that panics.
struct Panicky;

impl Workflow for Panicky {
    fn run<'a>(
        &'a mut self,
        _ctl: Controller,
    ) -> BoxFuture<'a, Result<WorkflowOutcome, ServerError>> {
        Box::pin(async { panic!("boom") })
    }
}

#[actix::test]
async fn a_panicking_workflow_is_an_error_and_the_run_still_ends() {
    let network = Network::new();
    let (server, _events) = server_with_events(&network, &["site-1"]).await;
    let mut client = FakeClient::start(&network, "site-1", JOB).await;
    let err = within(server.run_workflow(&mut Panicky)).await.unwrap_err();
    assert!(
        matches!(&err, ServerError::WorkflowPanicked { workflow, message }
            if workflow == "workflow" && message == "boom"),
        "{err}"
    );
    client.end_run_notice().await;
    assert_eq!(server.run_phase().await.unwrap(), RunPhase::Ended);
    server.stop().await;
}

#[actix::test]
async fn an_aborted_run_ends_the_waiting_round_with_aborted() {
    let network = Network::new();
    let (server, _events) = server_with_events(&network, &["site-1"]).await;
    let dir = temp_dir("abort");
    let mut workflow = sag(SagConfig::new(1, 1), &dir);
    let runner = server.clone();
    let running = tokio::task::spawn_local(async move { runner.run_workflow(&mut workflow).await });
    // wait until the round's task is out (site-1 can see it), then abort
    let client = FakeClient::start(&network, "site-1", JOB).await;
    let task = client.next_task(None).await;
    assert_eq!(task_name(&task), "train");
    server.abort();
    let err = within(running).await.unwrap().unwrap_err();
    assert!(
        matches!(&err, ServerError::RoundFailed { round: 0, source } if matches!(**source, ServerError::Aborted)),
        "{err}"
    );
    assert_eq!(task_name(&client.ask(None).await), "__end_run__");
    server.stop().await;
}
