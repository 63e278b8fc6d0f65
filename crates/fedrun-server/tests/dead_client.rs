//! Client jobs that lose their connection mid-round: one gone for longer than the client grace
//! is counted out of the round at once (the round completes with the others when `min_clients`
//! still can be met, else the run fails then, and every client job is told that it failed);
//! one that is back within the grace is kept. The connection reports are what `fedrun server`
//! derives from its transport ([`ServerJob::client_connection`]); here the test makes them.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use fedrun_cell::{request_handler, CellMessage, Network};
use fedrun_core::{NdArray, Shareable, Value};
use fedrun_server::{
    FedAvg, ModelWeights, NpyPersistor, SagConfig, ScatterAndGather, ServerError, ServerJob,
    WorkflowEvent, WorkflowOutcome, RUN_FAILED_REASON, RUN_FAILED_TOPIC,
};
use tokio::sync::mpsc;

use common::{temp_dir, weights_result, within, FakeClient, POLL};

const JOB: &str = "job-dead";
/// Far longer than any test may take: a round that ends did not wait for it.
const LONG: Duration = Duration::from_secs(600);
/// The client grace of these tests.
const GRACE: Duration = Duration::from_millis(100);

async fn server(
    network: &Network,
    clients: &[&str],
) -> (ServerJob, mpsc::UnboundedReceiver<WorkflowEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let server = within(
        ServerJob::builder(JOB)
            .job_clients(clients)
            .poll_interval(POLL)
            .client_grace(GRACE)
            .events(tx)
            .start(network),
    )
    .await
    .unwrap();
    (server, rx)
}

/// A SAG of one round that, once `min_clients` succeeded, keeps waiting for the others for
/// [`LONG`] (and has no task timeout): only counting a client out can end it early.
fn patient_sag(min_clients: usize, dir: &std::path::Path) -> ScatterAndGather {
    let mut initial = ModelWeights::new();
    initial.insert("w".into(), NdArray::from_f32(&[2], &[0.0, 0.0]).unwrap());
    let persistor = NpyPersistor::new(dir).with_initial_weights(initial);
    ScatterAndGather::new(
        SagConfig::new(min_clients, 1).with_wait_time_after_min_received(LONG),
        Arc::new(FedAvg::default()),
        Arc::new(persistor),
    )
}

fn spawn_run(
    server: &ServerJob,
    mut sag: ScatterAndGather,
) -> tokio::task::JoinHandle<Result<WorkflowOutcome, ServerError>> {
    let server = server.clone();
    actix::spawn(async move { server.run_workflow(&mut sag).await })
}

/// Takes the round's task and answers it with `w = [v, v]`.
async fn train(client: &FakeClient, v: f32) {
    let task = client.next_task(None).await;
    let result = weights_result(&[("w", &[2], &[v, v])], 1, &[]);
    assert_eq!(
        client.submit(&task, result).await.return_code().as_str(),
        "ok"
    );
}

/// The next result event of `client`: whether it succeeded.
async fn result_of(events: &mut mpsc::UnboundedReceiver<WorkflowEvent>, client: &str) -> bool {
    within(async {
        loop {
            if let Some(WorkflowEvent::ResultReceived {
                client: c, success, ..
            }) = events.recv().await
            {
                if c == client {
                    return success;
                }
            }
        }
    })
    .await
}

/// Records the run-failed notices `client` receives.
async fn listen_for_run_failed(client: &FakeClient) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    client
        .cell
        .register_request_handler(
            "aux_communication",
            RUN_FAILED_TOPIC,
            request_handler(move |msg: CellMessage| {
                let why = msg
                    .payload
                    .into_shareable()
                    .and_then(|s| {
                        s.header_or_none(RUN_FAILED_REASON)
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                    })
                    .unwrap_or_default();
                let _ = tx.send(why);
                async move { Ok(Some(CellMessage::new(Shareable::new()))) }
            }),
        )
        .await
        .unwrap();
    rx
}

#[actix::test]
async fn a_client_gone_past_the_grace_is_counted_out_and_the_round_completes_with_the_others() {
    let network = Network::new();
    let sites = ["site-1", "site-2", "site-3"];
    let (server, mut events) = server(&network, &sites).await;
    let mut clients = Vec::new();
    for site in sites {
        clients.push(FakeClient::start(&network, site, JOB).await);
        server.client_connection(site, true);
    }
    let dir = temp_dir("dead-ok");
    let run = spawn_run(&server, patient_sag(2, &dir));

    // site-3 takes its task, then its connection closes for good
    let _ = clients[2].next_task(None).await;
    server.client_connection("site-3", false);
    train(&clients[0], 1.0).await;
    train(&clients[1], 3.0).await;

    assert!(
        !result_of(&mut events, "site-3").await,
        "site-3 counted out as failed"
    );
    let outcome = within(run).await.unwrap().unwrap();
    let round = &outcome.rounds[0];
    assert_eq!(round.clients, ["site-1", "site-2"]);
    assert_eq!(round.failed_clients, ["site-3"]);
    assert_eq!(
        outcome.model.unwrap()["w"].to_f32_vec().unwrap(),
        vec![2.0, 2.0]
    );
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix::test]
async fn a_client_gone_past_the_grace_fails_the_run_at_once_when_min_clients_cannot_be_met() {
    let network = Network::new();
    let sites = ["site-1", "site-2"];
    let (server, _events) = server(&network, &sites).await;
    let mut survivor = FakeClient::start(&network, "site-1", JOB).await;
    let mut run_failed = listen_for_run_failed(&survivor).await;
    let killed = FakeClient::start(&network, "site-2", JOB).await;
    for site in sites {
        server.client_connection(site, true);
    }
    let dir = temp_dir("dead-fail");
    let run = spawn_run(&server, patient_sag(2, &dir));

    let _ = killed.next_task(None).await;
    killed.stop().await;
    server.client_connection("site-2", false);
    train(&survivor, 1.0).await;

    let err = within(run).await.unwrap().unwrap_err();
    assert!(
        matches!(&err, ServerError::RoundFailed { round: 0, source }
            if matches!(**source, ServerError::NotEnoughResponses { got: 1, needed: 2 })),
        "{err}"
    );
    // the survivor is told the run failed, and why, before the end of the run
    let why = within(run_failed.recv()).await.unwrap();
    assert!(why.contains("round 0"), "{why}");
    let _ = survivor.end_run_notice().await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix::test]
async fn a_client_back_within_the_grace_is_kept() {
    let network = Network::new();
    let sites = ["site-1", "site-2", "site-3"];
    let (server, mut events) = server(&network, &sites).await;
    let mut clients = Vec::new();
    for site in sites {
        clients.push(FakeClient::start(&network, site, JOB).await);
        server.client_connection(site, true);
    }
    let dir = temp_dir("dead-back");
    let run = spawn_run(&server, patient_sag(2, &dir));

    let task = clients[1].next_task(None).await;
    // site-2's connection drops and comes back at once; then site-3's drops for good. The
    // grace timers run in that order: once site-3 is counted out, site-2's grace has passed
    // too, without effect.
    server.client_connection("site-2", false);
    server.client_connection("site-2", true);
    server.client_connection("site-3", false);
    assert!(
        !result_of(&mut events, "site-3").await,
        "site-3 counted out"
    );

    let result = weights_result(&[("w", &[2], &[3.0, 3.0])], 1, &[]);
    clients[1].submit(&task, result).await;
    assert!(
        result_of(&mut events, "site-2").await,
        "site-2's result counts"
    );
    train(&clients[0], 1.0).await;

    let outcome = within(run).await.unwrap().unwrap();
    assert_eq!(outcome.rounds[0].clients, ["site-1", "site-2"]);
    assert_eq!(outcome.rounds[0].failed_clients, ["site-3"]);
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix::test]
async fn a_client_gone_before_the_round_is_counted_out_of_its_task_without_a_wait() {
    let network = Network::new();
    let sites = ["site-1", "site-2"];
    let (server, mut events) = server(&network, &sites).await;
    let survivor = FakeClient::start(&network, "site-1", JOB).await;
    server.client_connection("site-1", true);
    server.client_connection("site-2", true);
    server.client_connection("site-2", false);
    // counted out before the round even starts: the round does not wait for it
    let dir = temp_dir("dead-before");
    let mut initial = ModelWeights::new();
    initial.insert("w".into(), NdArray::from_f32(&[2], &[0.0, 0.0]).unwrap());
    let sag = ScatterAndGather::new(
        SagConfig::new(1, 1).with_wait_time_after_min_received(LONG),
        Arc::new(FedAvg::default()),
        Arc::new(NpyPersistor::new(&dir).with_initial_weights(initial)),
    );
    // site-2's first result event is its count-out (at the end of the grace, or when the task
    // is posted if the grace passed already)
    let run = spawn_run(&server, sag);
    assert!(!result_of(&mut events, "site-2").await);
    train(&survivor, 5.0).await;
    let outcome = within(run).await.unwrap().unwrap();
    assert_eq!(outcome.rounds[0].clients, ["site-1"]);
    assert_eq!(outcome.rounds[0].failed_clients, ["site-2"]);
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
