//! fedrun over TCP: `fedrun simulate --transport tcp` computes exactly what the in-process run
//! computes, and a federation of separate processes (`fedrun server` + 2× `fedrun client`, the
//! built binary) runs to its end and leaves its results in the server's workspace. The command
//! errors (no server, port in use, no clients before the deadline, a server that goes away) end
//! with a non-zero exit or a typed error naming the cause, within a deadline.
//! Every wait has a deadline; child processes are killed if a test fails (`kill_on_drop`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fedrun_cell::{AbortSignal, Fqcn};
use fedrun_cli::client_cmd::{run_client, ClientOptions};
use fedrun_cli::factories::SiteFactory;
use fedrun_cli::job::JobDefinition;
use fedrun_cli::transport::{listen_server, TransportKind};
use fedrun_cli::{
    CliError, ClientEnd, NoObserver, RunStatus, Simulation, SimulationReport, SimulationSetup,
};
use fedrun_core::{DataKind, Dxo, FlContext, NdArray, Shareable, Value};
use fedrun_engine::{executor_factory, Component, Executor, RunEnd};
use futures::future::BoxFuture;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

/// The deadline of one simulated run.
const RUN_DEADLINE: Duration = Duration::from_secs(30);
/// The deadline of a whole multi-process run.
const PROCESS_DEADLINE: Duration = Duration::from_secs(60);
/// Length of the stub model's only array.
const MODEL_LEN: usize = 4;

/// Adds `add` to every weight and reports `steps` as its FedAvg weight.
struct StubTrainer {
    add: f32,
    steps: i64,
}

impl Component for StubTrainer {}

impl Executor for StubTrainer {
    fn execute<'a>(
        &'a self,
        _task_name: &'a str,
        task: Shareable,
        _ctx: &'a FlContext,
        _abort: AbortSignal,
    ) -> BoxFuture<'a, Result<Shareable, String>> {
        Box::pin(async move {
            let dxo = Dxo::from_shareable(&task).map_err(|e| e.to_string())?;
            let w = dxo
                .data
                .get("w")
                .and_then(Value::as_ndarray)
                .ok_or("no w")?
                .to_f32_vec()
                .map_err(|e| e.to_string())?;
            let w: Vec<f32> = w.iter().map(|x| x + self.add).collect();
            let mut data = fedrun_core::Map::new();
            data.insert("w", NdArray::from_f32(&[w.len()], &w).unwrap());
            let mut out = Dxo::new(DataKind::Weights, data);
            out.meta.insert("NUM_STEPS_CURRENT_ROUND", self.steps);
            out.meta.insert("loss", f64::from(self.add));
            Ok(out.to_shareable())
        })
    }
}

/// `site-{i+1}` adds `sites[i].0` with weight `sites[i].1`.
fn stub_factory(sites: Vec<(f32, i64)>) -> (String, SiteFactory) {
    let sites = Arc::new(sites);
    let make: SiteFactory = Arc::new(move |site: &str| {
        let index: usize = site
            .strip_prefix("site-")
            .and_then(|i| i.parse().ok())
            .expect("sites are site-N");
        let (add, steps) = sites[index - 1];
        executor_factory(move |_args| Ok(StubTrainer { add, steps }))
    });
    ("test.StubTrainer".to_owned(), make)
}

/// The stub on `train`, FedAvg over `WEIGHTS`, a zero model of [`MODEL_LEN`] values.
fn stub_job(min_clients: usize, rounds: u64) -> JobDefinition {
    let client = json!({
        "format_version": 2,
        "executors": [{"tasks": ["train"], "executor": {"id": "stub", "path": "test.StubTrainer", "args": {}}}],
        "components": []
    });
    let server = json!({
        "format_version": 2,
        "components": [
            {"id": "persistor", "path": "fedrun.examples.ZeroModelPersistor",
             "args": {"arrays": {"w": [MODEL_LEN]}}},
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
    std::env::temp_dir().join(format!("fedrun-cli-tcp-{}", uuid::Uuid::new_v4()))
}

fn cleanup(ws: &Path) {
    match std::fs::remove_dir_all(ws) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("cannot remove {}: {e}", ws.display()),
    }
}

async fn simulate_stub(transport: TransportKind, ws: &Path) -> SimulationReport {
    // Steps 1, 2, 5 and increments 1, 2, 4: each round adds exactly 25/8 = 3.125.
    let sites = vec![(1.0, 1), (2.0, 2), (4.0, 5)];
    let mut setup = SimulationSetup::new(stub_job(3, 3), sites.len(), ws);
    setup.client_factories.push(stub_factory(sites));
    setup.transport = transport;
    let simulation = Simulation::start(setup).await.unwrap();
    tokio::time::timeout(RUN_DEADLINE, simulation.run(&mut NoObserver))
        .await
        .expect("the run ended before its deadline")
}

#[actix::test]
async fn simulation_over_tcp_gives_exactly_the_in_process_model_and_rounds() {
    let (ws_inproc, ws_tcp) = (temp_workspace(), temp_workspace());
    let inproc = simulate_stub(TransportKind::InProc, &ws_inproc).await;
    let tcp = simulate_stub(TransportKind::Tcp, &ws_tcp).await;

    for report in [&inproc, &tcp] {
        assert_eq!(report.status, RunStatus::Completed);
        assert_eq!(report.round_metrics.len(), 3);
        for round in &report.round_metrics {
            assert_eq!(round.clients, ["site-1", "site-2", "site-3"]);
            assert_eq!(round.metrics["loss"], 3.125);
        }
        for client in &report.clients {
            let ClientEnd::Finished(outcome) = &client.end else {
                panic!("{} did not finish: {}", client.site, client.end);
            };
            assert_eq!(outcome.ended_by, RunEnd::EndRun, "{}", client.site);
            assert_eq!(outcome.results_sent, 3, "{}", client.site);
        }
    }
    let w = |r: &SimulationReport| r.model.as_ref().unwrap()["w"].to_f32_vec().unwrap();
    assert_eq!(w(&tcp), vec![9.375; MODEL_LEN]);
    assert_eq!(w(&tcp), w(&inproc));
    // The persistor of the TCP run saved the same model.
    let saved = fedrun_server::load_npy_model(&ws_tcp.join("models")).unwrap();
    assert_eq!(saved["w"].to_f32_vec().unwrap(), w(&inproc));
    cleanup(&ws_inproc);
    cleanup(&ws_tcp);
}

/// `fedrun <args>`, output piped, killed if the test drops it.
fn fedrun(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_fedrun"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the fedrun binary starts")
}

/// Waits for `child` to exit (its output collected), at most [`PROCESS_DEADLINE`].
async fn finish(child: Child, what: &str) -> Output {
    tokio::time::timeout(PROCESS_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not exit within {PROCESS_DEADLINE:?}"))
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[actix::test]
async fn server_and_two_client_processes_finish_with_exit_0_and_the_model_in_the_workspace() {
    let ws = temp_workspace();
    let job_id = format!("tcp-{}", uuid::Uuid::new_v4());
    let ws_arg = ws.to_string_lossy().into_owned();
    let mut server = fedrun(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--clients",
        "site-1,site-2",
        "--rounds",
        "2",
        "--workspace",
        &ws_arg,
        "--job-id",
        &job_id,
        "--timeout",
        "60",
        "--poll-interval-ms",
        "20",
    ]);
    // The first stdout line gives the port and the job id.
    let mut server_out = BufReader::new(server.stdout.take().unwrap());
    let mut first = String::new();
    tokio::time::timeout(PROCESS_DEADLINE, server_out.read_line(&mut first))
        .await
        .expect("the server prints its address")
        .unwrap();
    let url = first
        .trim_end()
        .strip_prefix("listening ")
        .and_then(|rest| rest.strip_suffix(&format!(" job {job_id}")))
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_owned();
    assert!(url.starts_with("tcp://127.0.0.1:"), "{url}");
    assert_ne!(url, "tcp://127.0.0.1:0");

    let clients: Vec<Child> = ["site-1", "site-2"]
        .iter()
        .map(|site| {
            fedrun(&[
                "client",
                "--server",
                &url,
                "--name",
                site,
                "--job-id",
                &job_id,
                "--timeout",
                "60",
            ])
        })
        .collect();
    let mut rest = String::new();
    let (server_done, rest_read, site1, site2) = {
        let mut clients = clients.into_iter();
        let (c1, c2) = (clients.next().unwrap(), clients.next().unwrap());
        tokio::join!(
            finish(server, "fedrun server"),
            tokio::time::timeout(PROCESS_DEADLINE, server_out.read_to_string(&mut rest)),
            finish(c1, "fedrun client site-1"),
            finish(c2, "fedrun client site-2"),
        )
    };
    rest_read.expect("the server's stdout closes").unwrap();

    for (site, out) in [("site-1", &site1), ("site-2", &site2)] {
        assert!(
            out.status.success(),
            "{site}: {:?}\n{}",
            out.status,
            text(&out.stderr)
        );
        assert_eq!(
            text(&out.stdout).trim_end(),
            format!("{site} (job {job_id}): run ended by the server; 2 task(s), 2 result(s) sent")
        );
    }
    assert!(
        server_done.status.success(),
        "server: {:?}\n{}",
        server_done.status,
        text(&server_done.stderr)
    );
    assert!(
        rest.starts_with(&format!("job logreg ({job_id}), 2 clients, 2 round(s)")),
        "{rest}"
    );

    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["outcome"], json!("completed"));
    assert_eq!(metrics["job_id"], json!(job_id));
    let rounds = metrics["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    assert!(
        rounds.iter().all(|r| r["clients"] == json!(2)),
        "{rounds:?}"
    );
    assert!(ws.join("model.json").is_file());
    let model = fedrun_server::load_npy_model(&ws.join("models")).unwrap();
    let w = model["w"].to_f32_vec().unwrap();
    assert_eq!(w.len(), 10);
    assert!(w.iter().any(|x| *x != 0.0), "the model was trained: {w:?}");
    cleanup(&ws);
}

#[actix::test]
async fn client_without_a_server_exits_non_zero_naming_the_server_after_its_timeout() {
    // A port that was just free: nobody listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("tcp://127.0.0.1:{port}");
    let client = fedrun(&[
        "client",
        "--server",
        &url,
        "--name",
        "site-1",
        "--job-id",
        "j",
        "--timeout",
        "1",
    ]);
    let out = finish(client, "fedrun client").await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "timed out after 1 s waiting for the server at {url} to accept site-1's connection"
        )),
        "{err}"
    );
}

#[actix::test]
async fn server_on_a_port_in_use_exits_non_zero_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let ws = temp_workspace();
    let server = fedrun(&[
        "server",
        "--listen",
        &addr,
        "--clients",
        "site-1",
        "--workspace",
        &ws.to_string_lossy(),
    ]);
    let out = finish(server, "fedrun server").await;
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "invalid option --listen: cannot listen on tcp://{addr}"
        )),
        "{err}"
    );
    drop(taken);
    cleanup(&ws);
}

#[actix::test]
async fn server_whose_clients_never_come_times_out_non_zero_and_still_writes_metrics() {
    let ws = temp_workspace();
    let server = fedrun(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--clients",
        "site-1,site-2",
        "--workspace",
        &ws.to_string_lossy(),
        "--timeout",
        "1",
    ]);
    let out = finish(server, "fedrun server").await;
    assert!(!out.status.success());
    assert!(text(&out.stdout).starts_with("listening tcp://127.0.0.1:"));
    let err = text(&out.stderr);
    assert!(
        err.contains("timed out after 1 s waiting for the run to end (0 of 5 round(s) completed"),
        "{err}"
    );
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws.join("metrics.json")).unwrap()).unwrap();
    let outcome = metrics["outcome"].as_str().unwrap();
    assert!(
        outcome.starts_with("aborted: timed out after 1 s"),
        "{outcome}"
    );
    cleanup(&ws);
}

#[actix::test]
async fn client_whose_server_goes_away_ends_with_an_error_naming_it() {
    // A bare server endpoint: it accepts the client's connection but runs no server job, so
    // the client keeps trying to sync until the endpoint goes away.
    let (fake_server, addr) = listen_server("127.0.0.1:0").await.unwrap();
    let mut options = ClientOptions::new(&format!("tcp://{addr}"), "site-1", "job-1");
    options.timeout = Duration::from_secs(30);
    options.server_lost_grace = Duration::from_millis(500);
    let client = actix::spawn(run_client(options));

    let site = Fqcn::job_cell("site-1", "job-1").unwrap();
    assert!(
        fake_server
            .wait_for_peer(&site, Duration::from_secs(10))
            .await
    );
    fake_server.shutdown().await;
    let result = tokio::time::timeout(Duration::from_secs(15), client)
        .await
        .expect("the client ended before its deadline")
        .unwrap();
    let Err(CliError::RunFailed(why)) = result else {
        panic!("expected a failed run, got {result:?}");
    };
    assert!(
        why.contains(&format!(
            "lost the server at tcp://{addr} for more than 0.5 s"
        )),
        "{why}"
    );
}
