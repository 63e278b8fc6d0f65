//! Whole federations through the library entry `fedrun simulate` uses: a server job running
//! ScatterAndGather with FedAvg and client jobs with real `ClientRunner`s on one in-process
//! network. Deterministic stub executors make the aggregation arithmetic exact; executors that
//! block until aborted give the tests a known point "in the middle of a round" to act at.
//! Every run has a deadline; nothing sleeps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedrun_cell::AbortSignal;
use fedrun_cli::factories::SiteFactory;
use fedrun_cli::job::JobDefinition;
use fedrun_cli::{
    simulate, ClientEnd, NoObserver, RunStatus, SimulateOptions, Simulation, SimulationReport,
    SimulationSetup,
};
use fedrun_core::{DataKind, Dxo, FlContext, NdArray, Shareable, Value};
use fedrun_engine::{executor_factory, Component, Executor, RunEnd};
use futures::future::BoxFuture;
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};

/// The deadline of one whole simulated run.
const RUN_DEADLINE: Duration = Duration::from_secs(15);
/// The deadline for a stub executor to report that it is blocked in its round.
const SIGNAL_DEADLINE: Duration = Duration::from_secs(10);
/// Length of the test model's only array.
const MODEL_LEN: usize = 4;

/// What one site's stub executor does.
#[derive(Clone)]
struct Behaviour {
    /// Added to every weight of the received model.
    add: f32,
    /// Reported as `NUM_STEPS_CURRENT_ROUND` (the site's FedAvg weight).
    steps: i64,
    /// Fail every task.
    fail: bool,
    /// In this round, say so on `entered`, open `gate` and wait for the task's abort signal.
    block_in_round: Option<u64>,
    entered: Option<mpsc::UnboundedSender<(String, u64)>>,
    gate: Option<Arc<Semaphore>>,
    /// In this round, wait for `gate` to open before training.
    wait_gate_in_round: Option<u64>,
}

impl Behaviour {
    fn adds(add: f32, steps: i64) -> Self {
        Self {
            add,
            steps,
            fail: false,
            block_in_round: None,
            entered: None,
            gate: None,
            wait_gate_in_round: None,
        }
    }
}

struct StubTrainer {
    site: String,
    behaviour: Behaviour,
}

impl Component for StubTrainer {}

impl Executor for StubTrainer {
    fn execute<'a>(
        &'a self,
        _task_name: &'a str,
        task: Shareable,
        _ctx: &'a FlContext,
        abort: AbortSignal,
    ) -> BoxFuture<'a, Result<Shareable, String>> {
        Box::pin(async move {
            let b = &self.behaviour;
            let round = task
                .header_or_none("current_round")
                .and_then(Value::as_u64)
                .ok_or("no current_round")?;
            if b.fail {
                return Err(format!("{} fails on purpose", self.site));
            }
            if b.block_in_round == Some(round) {
                if let Some(tx) = &b.entered {
                    tx.send((self.site.clone(), round)).unwrap();
                }
                if let Some(gate) = &b.gate {
                    gate.add_permits(1);
                }
                abort.triggered().await;
                return Err(format!("{} aborted in round {round}", self.site));
            }
            if b.wait_gate_in_round == Some(round) {
                let gate = b.gate.as_ref().ok_or("no gate")?;
                let _open = gate.acquire().await.map_err(|e| e.to_string())?;
            }
            let dxo = Dxo::from_shareable(&task).map_err(|e| e.to_string())?;
            let w = dxo
                .data
                .get("w")
                .and_then(Value::as_ndarray)
                .ok_or("no w")?
                .to_f32_vec()
                .map_err(|e| e.to_string())?;
            let w: Vec<f32> = w.iter().map(|x| x + b.add).collect();
            let mut data = fedrun_core::Map::new();
            data.insert("w", NdArray::from_f32(&[w.len()], &w).unwrap());
            let mut out = Dxo::new(DataKind::Weights, data);
            out.meta.insert("NUM_STEPS_CURRENT_ROUND", b.steps);
            out.meta.insert("loss", f64::from(b.add));
            Ok(out.to_shareable())
        })
    }
}

/// The stub's factory: `behaviours[i]` for `site-{i+1}`.
fn stub_factory(behaviours: Vec<Behaviour>) -> (String, SiteFactory) {
    let behaviours = Arc::new(behaviours);
    let make: SiteFactory = Arc::new(move |site: &str| {
        let index: usize = site
            .strip_prefix("site-")
            .and_then(|i| i.parse().ok())
            .expect("sites are site-N");
        let behaviour = behaviours[index - 1].clone();
        let site = site.to_owned();
        executor_factory(move |_args| {
            Ok(StubTrainer {
                site: site.clone(),
                behaviour: behaviour.clone(),
            })
        })
    });
    ("test.StubTrainer".to_owned(), make)
}

/// A job: the stub on `train`, FedAvg over `WEIGHTS`, a zero model of [`MODEL_LEN`] values.
fn stub_job(min_clients: usize, rounds: u64) -> JobDefinition {
    let client = json!({
        "format_version": 2,
        "executors": [{"tasks": ["train"], "executor": {"id": "stub", "path": "test.StubTrainer", "args": {}}}],
        "task_data_filters": [],
        "task_result_filters": [],
        "components": []
    });
    let server = json!({
        "format_version": 2,
        "components": [
            {"id": "persistor", "path": "fedrun.examples.ZeroModelPersistor",
             "args": {"arrays": {"w": [MODEL_LEN]}}},
            {"id": "shareable_generator", "name": "FullModelShareableGenerator", "args": {}},
            {"id": "aggregator", "name": "InTimeAccumulateWeightedAggregator",
             "args": {"expected_data_kind": "WEIGHTS"}}
        ],
        "workflows": [{"id": "sag", "name": "ScatterAndGather", "args": {
            "min_clients": min_clients, "num_rounds": rounds, "wait_time_after_min_received": 0,
            "aggregator_id": "aggregator", "persistor_id": "persistor", "train_task_name": "train"
        }}]
    });
    JobDefinition::from_configs("stub", json!({}), client, server).unwrap()
}

fn temp_workspace() -> PathBuf {
    std::env::temp_dir().join(format!("fedrun-cli-test-{}", uuid::Uuid::new_v4()))
}

/// Removes a test workspace (runs that fail before saving a model leave none).
fn cleanup(ws: &Path) {
    match std::fs::remove_dir_all(ws) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("cannot remove {}: {e}", ws.display()),
    }
}

fn setup(job: JobDefinition, behaviours: Vec<Behaviour>, workspace: &Path) -> SimulationSetup {
    let mut setup = SimulationSetup::new(job, behaviours.len(), workspace);
    setup.client_factories.push(stub_factory(behaviours));
    setup
}

/// Runs a started simulation with a deadline.
async fn run(simulation: Simulation) -> SimulationReport {
    tokio::time::timeout(RUN_DEADLINE, simulation.run(&mut NoObserver))
        .await
        .expect("the run ended before its deadline")
}

fn final_w(report: &SimulationReport) -> Vec<f32> {
    report.model.as_ref().expect("a final model")["w"]
        .to_f32_vec()
        .unwrap()
}

fn end_of(report: &SimulationReport, site: &str) -> ClientEnd {
    report
        .clients
        .iter()
        .find(|c| c.site == site)
        .map(|c| c.end.clone())
        .unwrap()
}

#[actix::test]
async fn final_model_is_the_exact_step_weighted_mean_and_end_of_run_reaches_every_client() {
    let ws = temp_workspace();
    // Steps 1, 2, 5 (sum 8) and increments 1, 2, 4: each round adds (1 + 4 + 20) / 8 = 3.125,
    // exactly representable, so the comparison is exact.
    let behaviours = vec![
        Behaviour::adds(1.0, 1),
        Behaviour::adds(2.0, 2),
        Behaviour::adds(4.0, 5),
    ];
    let expected_step: f64 = behaviours
        .iter()
        .map(|b| f64::from(b.add) * b.steps as f64)
        .sum::<f64>()
        / behaviours.iter().map(|b| b.steps as f64).sum::<f64>();
    let simulation = Simulation::start(setup(stub_job(3, 3), behaviours, &ws))
        .await
        .unwrap();
    let report = run(simulation).await;

    assert_eq!(report.status, RunStatus::Completed);
    let expected = (3.0 * expected_step) as f32;
    assert_eq!(expected, 9.375);
    assert_eq!(final_w(&report), vec![expected; MODEL_LEN]);
    assert_eq!(report.round_metrics.len(), 3);
    for (i, round) in report.round_metrics.iter().enumerate() {
        assert_eq!(round.round as usize, i);
        assert_eq!(round.clients, ["site-1", "site-2", "site-3"]);
        // The round's loss is the step-weighted mean of the clients' meta, like the model.
        assert_eq!(round.metrics["loss"], expected_step);
    }
    for client in &report.clients {
        let ClientEnd::Finished(outcome) = &client.end else {
            panic!("{} did not finish: {}", client.site, client.end);
        };
        assert_eq!(outcome.ended_by, RunEnd::EndRun, "{}", client.site);
        assert_eq!(outcome.results_sent, 3, "{}", client.site);
    }
    // The persistor saved the final model in the workspace.
    let saved = fedrun_server::load_npy_model(&ws.join("models")).unwrap();
    assert_eq!(saved["w"].to_f32_vec().unwrap(), vec![expected; MODEL_LEN]);
    cleanup(&ws);
}

#[actix::test]
async fn client_aborted_mid_round_ends_the_run_as_aborted_without_hanging() {
    let ws = temp_workspace();
    let (tx, mut entered) = mpsc::unbounded_channel();
    let mut blocking = Behaviour::adds(2.0, 1);
    blocking.block_in_round = Some(1);
    blocking.entered = Some(tx);
    let behaviours = vec![Behaviour::adds(1.0, 1), blocking, Behaviour::adds(3.0, 1)];
    let simulation = Simulation::start(setup(stub_job(3, 3), behaviours, &ws))
        .await
        .unwrap();
    let control = simulation.control();
    let running = actix::spawn(run(simulation));

    let signal = tokio::time::timeout(SIGNAL_DEADLINE, entered.recv()).await;
    assert_eq!(signal.unwrap(), Some(("site-2".to_owned(), 1)));
    assert_eq!(control.running_tasks("site-2"), ["train"]);
    assert!(control.abort_client("site-2").await.unwrap());
    let report = running.await.unwrap();

    let RunStatus::Aborted(why) = &report.status else {
        panic!("expected an aborted run, got {}", report.status);
    };
    assert!(why.contains("site-2 left during round 1"), "{why}");
    assert!(why.contains("min_clients 3"), "{why}");
    assert_eq!(report.round_metrics.len(), 1, "only round 0 completed");
    assert!(report.model.is_none());
    let ClientEnd::Finished(aborted) = end_of(&report, "site-2") else {
        panic!("site-2 did not finish");
    };
    assert_eq!(aborted.ended_by, RunEnd::Aborted);
    assert!(end_of(&report, "site-1").ended_by_end_run());
    assert!(end_of(&report, "site-3").ended_by_end_run());
    cleanup(&ws);
}

#[actix::test]
async fn server_aborted_mid_round_ends_every_client_run_by_end_of_run() {
    let ws = temp_workspace();
    let (tx, mut entered) = mpsc::unbounded_channel();
    let mut blocking = Behaviour::adds(1.0, 1);
    blocking.block_in_round = Some(1);
    blocking.entered = Some(tx);
    let behaviours = vec![blocking, Behaviour::adds(2.0, 1), Behaviour::adds(3.0, 1)];
    let simulation = Simulation::start(setup(stub_job(3, 3), behaviours, &ws))
        .await
        .unwrap();
    let control = simulation.control();
    let running = actix::spawn(run(simulation));

    let signal = tokio::time::timeout(SIGNAL_DEADLINE, entered.recv()).await;
    assert_eq!(signal.unwrap(), Some(("site-1".to_owned(), 1)));
    control.abort_server("stopped by the test");
    let report = running.await.unwrap();

    let RunStatus::Aborted(why) = &report.status else {
        panic!("expected an aborted run, got {}", report.status);
    };
    assert!(why.starts_with("stopped by the test"), "{why}");
    assert!(why.contains("round 1"), "{why}");
    assert_eq!(report.round_metrics.len(), 1);
    for client in &report.clients {
        assert!(
            client.end.ended_by_end_run(),
            "{}: {}",
            client.site,
            client.end
        );
    }
    cleanup(&ws);
}

#[actix::test]
async fn failing_executor_leaves_rounds_to_the_others_when_min_clients_allows() {
    let ws = temp_workspace();
    let mut failing = Behaviour::adds(100.0, 100);
    failing.fail = true;
    let behaviours = vec![Behaviour::adds(1.0, 1), Behaviour::adds(4.0, 3), failing];
    let simulation = Simulation::start(setup(stub_job(2, 2), behaviours, &ws))
        .await
        .unwrap();
    let report = run(simulation).await;

    assert_eq!(report.status, RunStatus::Completed);
    for round in &report.round_metrics {
        assert_eq!(round.clients, ["site-1", "site-2"]);
    }
    // (1*1 + 4*3) / 4 = 3.25 per round, site-3 never counted.
    assert_eq!(final_w(&report), vec![6.5; MODEL_LEN]);
    assert!(report.clients.iter().all(|c| c.end.ended_by_end_run()));
    cleanup(&ws);
}

#[actix::test]
async fn failing_executor_below_min_clients_fails_the_run_naming_the_shortfall() {
    let ws = temp_workspace();
    let mut failing = Behaviour::adds(1.0, 1);
    failing.fail = true;
    let behaviours = vec![Behaviour::adds(1.0, 1), Behaviour::adds(1.0, 1), failing];
    let simulation = Simulation::start(setup(stub_job(3, 2), behaviours, &ws))
        .await
        .unwrap();
    let report = run(simulation).await;

    let RunStatus::Failed(why) = &report.status else {
        panic!("expected a failed run, got {}", report.status);
    };
    assert!(why.contains("round 0"), "{why}");
    assert!(
        why.contains("not enough successful responses: got 2, needed 3"),
        "{why}"
    );
    assert!(report.round_metrics.is_empty());
    assert!(report.clients.iter().all(|c| c.end.ended_by_end_run()));
    cleanup(&ws);
}

#[actix::test]
async fn client_that_leaves_mid_run_lets_min_clients_finish_the_rounds() {
    let ws = temp_workspace();
    let (tx, mut entered) = mpsc::unbounded_channel();
    // site-3 blocks in round 1; site-1 waits in round 1 until site-3 is in, so round 1 cannot
    // complete (min_clients 2) before site-3 took its task.
    let gate = Arc::new(Semaphore::new(0));
    let mut leaving = Behaviour::adds(50.0, 1);
    leaving.block_in_round = Some(1);
    leaving.entered = Some(tx);
    leaving.gate = Some(Arc::clone(&gate));
    let mut waiting = Behaviour::adds(1.0, 1);
    waiting.wait_gate_in_round = Some(1);
    waiting.gate = Some(gate);
    let behaviours = vec![waiting, Behaviour::adds(3.0, 1), leaving];
    let simulation = Simulation::start(setup(stub_job(2, 3), behaviours, &ws))
        .await
        .unwrap();
    let control = simulation.control();
    let running = actix::spawn(run(simulation));

    let signal = tokio::time::timeout(SIGNAL_DEADLINE, entered.recv()).await;
    assert_eq!(signal.unwrap(), Some(("site-3".to_owned(), 1)));
    control.stop_client("site-3").await.unwrap();
    let report = running.await.unwrap();

    assert_eq!(report.status, RunStatus::Completed);
    assert_eq!(report.round_metrics.len(), 3);
    for round in &report.round_metrics[1..] {
        assert_eq!(round.clients, ["site-1", "site-2"]);
    }
    assert!(matches!(end_of(&report, "site-3"), ClientEnd::Stopped(_)));
    assert!(end_of(&report, "site-1").ended_by_end_run());
    assert!(end_of(&report, "site-2").ended_by_end_run());
    cleanup(&ws);
}

#[actix::test]
async fn client_that_leaves_below_min_clients_aborts_the_run_naming_it() {
    let ws = temp_workspace();
    let (tx, mut entered) = mpsc::unbounded_channel();
    let mut leaving = Behaviour::adds(50.0, 1);
    leaving.block_in_round = Some(0);
    leaving.entered = Some(tx);
    let behaviours = vec![Behaviour::adds(1.0, 1), leaving];
    let simulation = Simulation::start(setup(stub_job(2, 2), behaviours, &ws))
        .await
        .unwrap();
    let control = simulation.control();
    let running = actix::spawn(run(simulation));

    let signal = tokio::time::timeout(SIGNAL_DEADLINE, entered.recv()).await;
    assert_eq!(signal.unwrap(), Some(("site-2".to_owned(), 0)));
    control.stop_client("site-2").await.unwrap();
    let report = running.await.unwrap();

    let RunStatus::Aborted(why) = &report.status else {
        panic!("expected an aborted run, got {}", report.status);
    };
    assert!(why.contains("site-2 left during round 0"), "{why}");
    assert!(report.round_metrics.is_empty());
    assert!(end_of(&report, "site-1").ended_by_end_run());
    cleanup(&ws);
}

#[actix::test]
async fn example_logreg_job_dir_loads_and_runs_one_round_with_two_clients() {
    let ws = temp_workspace();
    let options = SimulateOptions {
        clients: 2,
        rounds: Some(1),
        workspace: Some(ws.clone()),
        job: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/logreg")),
        seed: None,
    };
    let report = tokio::time::timeout(RUN_DEADLINE, simulate(options, &mut NoObserver))
        .await
        .expect("the run ended before its deadline")
        .unwrap();

    assert_eq!(report.job_name, "logreg");
    assert_eq!(report.sites, ["site-1", "site-2"]);
    assert_eq!(report.round_metrics.len(), 1);
    let round = &report.round_metrics[0];
    assert_eq!(round.clients, ["site-1", "site-2"]);
    // Round 0 evaluates the zero model: every probability is 1/2, the loss ln 2.
    assert!((round.metrics["loss"] - std::f64::consts::LN_2).abs() < 1e-9);
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["outcome"], json!("completed"));
    assert_eq!(metrics["rounds"].as_array().unwrap().len(), 1);
    assert_eq!(metrics["rounds"][0]["clients"], json!(2));
    let model: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws.join("model.json")).unwrap()).unwrap();
    let names: Vec<&str> = model["arrays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b", "w"]);
    assert!(ws.join("models").join("w.npy").is_file());
    cleanup(&ws);
}

#[actix::test]
async fn a_job_dir_without_configs_is_refused_before_anything_starts() {
    let ws = temp_workspace();
    std::fs::create_dir_all(&ws).unwrap();
    let options = SimulateOptions {
        job: Some(ws.clone()),
        workspace: Some(ws.join("out")),
        ..SimulateOptions::default()
    };
    let err = simulate(options, &mut NoObserver).await.unwrap_err();
    assert!(err.to_string().contains("config_fed_client.json"), "{err}");
    cleanup(&ws);
}
