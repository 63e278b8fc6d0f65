//! `fedrun job` (the built binary) as NVFlare's client parent launches it, without Python: this
//! test process plays both the client parent (CP) and the server, with fedrun's own pieces.
//!
//! - The fake CP is an NVFlare endpoint named `site-1` listening on 127.0.0.1 (the `-p` URL)
//!   with a cell `site-1` that records every `admin`/`train.notify_job_status` request (headers
//!   and payload) and answers `ok`, and that sends `client_command/<topic>` requests to the job
//!   cell `site-1.<job>`. In relay mode it also connects to the server endpoint and relays the
//!   job's traffic, as NVFlare's CP does for a job that may not reach the server itself.
//! - The server is a fedrun server job (`server.<job>`) on an endpoint named `server`, running
//!   NVFlare's hello-numpy job (`examples/hello-numpy`: ScatterAndGather, NPModelPersistor,
//!   FedAvg) with `min_clients` 1: site-1's NPTrainer adds 1 per round, so after 2 rounds the
//!   global model is `[[3,4,5],[6,7,8],[9,10,11]]`.
//! - The job is deployed as NVFlare's CP deploys it: `<ws>/<job>/app_site-1/config/
//!   config_fed_client.json`, `<ws>/<job>/meta.json`, `<ws>/startup/fed_client.json`, and the
//!   process gets the stock worker's command line with its credentials in
//!   `NVFLARE_JOB_AUTH_TOKEN`/`NVFLARE_JOB_TOKEN_SIGNATURE`/`NVFLARE_JOB_SSID`.
//!
//! The job keeps NVFlare's default `np_download_chunk_size`: the job's results leave as
//! download references, which fedrun's server job pulls from the job before it aggregates.
//!
//! A parent that never listens is tested with a 1 s connect timeout
//! (`FEDRUN_JOB_CONNECT_TIMEOUT`). Every wait has a deadline; each `fedrun job` process runs in
//! its own process group and is killed by pid when its handle is dropped, pass or fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fedrun_cell::{
    request_handler, Cell, CellCode, CellHandle, CellMessage, Fqcn, Headers, Payload, SendRequest,
};
use fedrun_cli::cj::parent::{
    admin_message, ADMIN_CHANNEL, ADMIN_MESSAGE_CLASS, CLIENT_COMMAND_CHANNEL,
    NOTIFY_JOB_STATUS_TOPIC,
};
use fedrun_cli::factories::server_factories;
use fedrun_cli::job::JobDefinition;
use fedrun_core::{CellReturnCode, Map, NdArray, Value};
use fedrun_server::{ServerError, ServerJob, ServerJobConfig, WorkflowEvent, WorkflowOutcome};
use fedrun_wire::{TcpTransport, WireConfig};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// The upper bound of every wait in this file (a whole hello-numpy run takes about a second).
const DEADLINE: Duration = Duration::from_secs(30);
/// How long a job process gets to exit by itself after an `abort`.
const ABORT_EXIT_DEADLINE: Duration = Duration::from_secs(10);
/// The site the job process runs for.
const SITE: &str = "site-1";
/// The credentials the CP hands its job process.
const TOKEN: &str = "tok-3f1c";
const TOKEN_SIGNATURE: &str = "sig-9a2e";
const SSID: &str = "ssid-77";

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello-numpy")
}

fn temp_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fedrun-job-cmd-{tag}-{}", uuid::Uuid::new_v4()))
}

fn expected_final_model() -> Vec<f32> {
    (3u8..=11).map(f32::from).collect()
}

fn read_npy(path: &Path) -> NdArray {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    NdArray::from_npy(bytes.into()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The server: hello-numpy's server config as a fedrun server job on its own endpoint.

struct Server {
    transport: TcpTransport,
    addr: SocketAddr,
    job: ServerJob,
    run: Option<tokio::task::JoinHandle<Result<Vec<WorkflowOutcome>, ServerError>>>,
    events: mpsc::UnboundedReceiver<WorkflowEvent>,
}

/// What the server saw of a run: the workflows' outcomes, and its endpoint's peers at each
/// result it received (the client job is connected then, whichever way it is).
struct ServerView {
    outcomes: Vec<WorkflowOutcome>,
    peers_at_results: Vec<Vec<Fqcn>>,
}

impl Server {
    /// hello-numpy for site-1 alone (`min_clients` 1), its models saved under `workspace`.
    async fn start(job_id: &str, workspace: &Path) -> Server {
        let mut job = JobDefinition::load(&example()).unwrap();
        job.set_min_clients(1).unwrap();
        let config = ServerJobConfig::from_value(job.server_config.clone()).unwrap();
        let built = config
            .build(&server_factories(workspace, &[]))
            .await
            .unwrap();
        let transport = TcpTransport::new(Fqcn::SERVER, WireConfig::default());
        let addr = transport.add_listener("tcp://127.0.0.1:0").await.unwrap();
        let (events_tx, events) = mpsc::unbounded_channel();
        let server = ServerJob::builder(job_id)
            .job_clients(&[SITE])
            .events(events_tx)
            .poll_interval(Duration::from_millis(50))
            .start_on(transport.clone())
            .await
            .unwrap();
        let mut workflows = built.workflows;
        let runner = server.clone();
        let run = actix::spawn(async move { runner.run_workflows(&mut workflows).await });
        Server {
            transport,
            addr,
            job: server,
            run: Some(run),
            events,
        }
    }

    /// Waits (at most [`DEADLINE`]) for the workflows to end, noting the endpoint's peers at
    /// each result received; `job_log` is shown if they did not end well.
    async fn outcome(&mut self, job_log: impl Fn() -> String) -> ServerView {
        let mut run = self.run.take().expect("the run is awaited once");
        let mut peers_at_results = Vec::new();
        let ended = tokio::time::timeout(DEADLINE, async {
            loop {
                tokio::select! {
                    biased;
                    Some(event) = self.events.recv() => {
                        if matches!(event, WorkflowEvent::ResultReceived { .. }) {
                            peers_at_results.push(self.transport.peers());
                        }
                    }
                    result = &mut run => break result,
                }
            }
        })
        .await;
        match ended {
            Ok(Ok(Ok(outcomes))) => ServerView {
                outcomes,
                peers_at_results,
            },
            Ok(Ok(Err(e))) => panic!("the workflows failed: {e}\n{}", job_log()),
            Ok(Err(e)) => panic!("the workflows panicked: {e}\n{}", job_log()),
            Err(_) => panic!(
                "the server's workflows did not end within {DEADLINE:?}\n{}",
                job_log()
            ),
        }
    }

    /// Aborts a run still going, then stops the server job and its endpoint.
    async fn stop(mut self) {
        if let Some(run) = self.run.take() {
            self.job.abort();
            let _ = tokio::time::timeout(DEADLINE, run).await;
        }
        self.job.stop().await;
        self.transport.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// The fake client parent.

/// One status notification the parent received.
struct Notice {
    headers: Headers,
    payload: Option<Value>,
}

struct FakeParent {
    transport: TcpTransport,
    cell: CellHandle,
    addr: SocketAddr,
    notices: mpsc::UnboundedReceiver<Notice>,
}

impl FakeParent {
    /// The CP endpoint `site-1` on a free loopback port; with `relay_to`, also connected to the
    /// server endpoint there (relaying is on by default).
    async fn start(relay_to: Option<SocketAddr>) -> FakeParent {
        let me = Fqcn::new(SITE).unwrap();
        let transport = TcpTransport::new(me.clone(), WireConfig::default());
        let addr = transport.add_listener("tcp://127.0.0.1:0").await.unwrap();
        if let Some(server) = relay_to {
            transport.add_connector(&format!("tcp://{server}")).unwrap();
            assert!(
                transport.wait_for_peer(&Fqcn::SERVER, DEADLINE).await,
                "the CP endpoint connected to the server"
            );
        }
        let cell = Cell::start(me, transport.clone()).unwrap();
        let (tx, notices) = mpsc::unbounded_channel();
        let record = request_handler(move |req: CellMessage| {
            let notice = Notice {
                headers: req.headers.clone(),
                payload: req.payload.as_value().map(|v| Value::clone(v)),
            };
            let sent = tx.send(notice);
            async move {
                sent.map_err(|_| fedrun_cell::HandlerError::ServiceUnavailable)?;
                Ok(Some(CellMessage::new(Payload::None)))
            }
        });
        cell.register_request_handler(ADMIN_CHANNEL, NOTIFY_JOB_STATUS_TOPIC, record)
            .await
            .unwrap();
        FakeParent {
            transport,
            cell,
            addr,
            notices,
        }
    }

    fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    /// The next status notification, at most [`DEADLINE`] away.
    async fn next_notice(&mut self) -> Notice {
        tokio::time::timeout(DEADLINE, self.notices.recv())
            .await
            .expect("a status notification before the deadline")
            .expect("the parent's cell is running")
    }

    /// The notifications received so far.
    fn received(&mut self) -> Vec<Notice> {
        std::iter::from_fn(|| self.notices.try_recv().ok()).collect()
    }

    /// Sends `client_command/<topic>` to the job cell, as NVFlare's CP does (an admin Message
    /// as the payload), and returns the reply.
    async fn command(&self, job_id: &str, topic: &str) -> CellMessage {
        let target = Fqcn::job_cell(SITE, job_id).unwrap();
        let body = CellMessage::new(Payload::value(admin_message(topic, "", Map::new())));
        let request = SendRequest::new(CLIENT_COMMAND_CHANNEL, topic, target, body, DEADLINE);
        tokio::time::timeout(
            DEADLINE + Duration::from_secs(1),
            self.cell.send_request(request),
        )
        .await
        .expect("the command was answered before the deadline")
        .unwrap()
    }

    async fn stop(self) {
        self.cell.stop().await;
        self.transport.shutdown().await;
    }
}

/// The job status a notification carries (NVFlare's admin Message, headers `job_id` and
/// `job_status`), after checking the credentials on its frame.
fn status_of<'a>(notice: &'a Notice, job_id: &str) -> i64 {
    for (header, expected) in [
        ("client_name", SITE),
        ("ssid", SSID),
        ("__token__", TOKEN),
        ("__token_signature__", TOKEN_SIGNATURE),
    ] {
        assert_eq!(
            notice.headers.get(header).and_then(Value::as_str),
            Some(expected),
            "header {header} of {:?}",
            notice.headers
        );
    }
    let payload = notice
        .payload
        .as_ref()
        .expect("a notification has a payload");
    let message = payload.as_tagged().expect("an admin Message data class");
    assert_eq!(message.type_name, ADMIN_MESSAGE_CLASS);
    let field = |map: &'a Value, key: &str| -> &'a Value {
        map.as_map()
            .and_then(|m| m.get(key))
            .unwrap_or_else(|| panic!("no {key} in {payload:?}"))
    };
    let fields = field(&message.data, "data");
    assert_eq!(
        field(fields, "topic").as_str(),
        Some(NOTIFY_JOB_STATUS_TOPIC)
    );
    let headers = field(fields, "headers").as_map().expect("a map of headers");
    assert_eq!(
        headers.get("job_id").and_then(Value::as_str),
        Some(job_id),
        "{payload:?}"
    );
    headers
        .get("job_status")
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("no job_status in {payload:?}"))
}

// ---------------------------------------------------------------------------------------------
// The job process.

/// How the site's kit reaches the server.
#[derive(Clone, Copy)]
enum Kit {
    /// scheme tcp, `connection_security: clear`: the job connects to the server itself.
    ClearTcp,
    /// scheme http (NVFlare's default): the job reaches the server through its parent only.
    Http,
}

impl Kit {
    fn scheme(self) -> &'static str {
        match self {
            Kit::ClearTcp => "tcp",
            Kit::Http => "http",
        }
    }
}

/// Deploys hello-numpy's client app into the site workspace `ws` as NVFlare's CP does, with
/// NPTrainer's `sleep_time` when given, and writes the startup kit.
fn deploy(ws: &Path, job_id: &str, server: SocketAddr, kit: Kit, sleep_time: Option<f64>) {
    let job = JobDefinition::load(&example()).unwrap();
    let mut client = job.client_config.clone();
    if let Some(secs) = sleep_time {
        client["executors"][0]["executor"]["args"] = json!({ "sleep_time": secs });
    }
    let config_dir = ws.join(job_id).join(format!("app_{SITE}")).join("config");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(
        config_dir.join("config_fed_client.json"),
        serde_json::to_vec_pretty(&client).unwrap(),
    )
    .unwrap();
    let mut meta = job.meta.clone();
    meta["job_id"] = json!(job_id);
    meta["min_clients"] = json!(1);
    meta["job_clients"] = json!([{ "name": SITE }]);
    std::fs::write(
        ws.join(job_id).join("meta.json"),
        serde_json::to_vec_pretty(&meta).unwrap(),
    )
    .unwrap();
    let startup = ws.join("startup");
    std::fs::create_dir_all(&startup).unwrap();
    let fed_client = json!({
        "format_version": 2,
        "servers": [{
            "name": "example_project",
            "service": {"target": format!("127.0.0.1:{}", server.port()), "scheme": kit.scheme()}
        }],
        "client": {"fqsn": SITE, "is_leaf": true, "connection_security": "clear"}
    });
    std::fs::write(
        startup.join("fed_client.json"),
        serde_json::to_vec_pretty(&fed_client).unwrap(),
    )
    .unwrap();
}

/// The stock worker's command line, as NVFlare's CP builds it.
fn worker_argv(
    ws: &Path,
    job_id: &str,
    parent_url: &str,
    server: SocketAddr,
    kit: Kit,
) -> Vec<String> {
    let ws_arg = ws.display().to_string();
    let startup = ws.join("startup").display().to_string();
    let target = format!("127.0.0.1:{}", server.port());
    [
        "-m",
        &ws_arg,
        "-w",
        &startup,
        "-n",
        job_id,
        "-c",
        SITE,
        "-p",
        parent_url,
        "--parent_conn_sec",
        "clear",
        "-g",
        &target,
        "-scheme",
        kit.scheme(),
        "-s",
        "fed_client.json",
        "--set",
        "secure_train=false",
        "uid=site-1",
        "org=nvidia",
        "config_folder=config",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// A running `fedrun job`; its stderr is read line by line as it comes. Killed (by pid) when
/// dropped.
struct JobProcess {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    log: Arc<Mutex<String>>,
}

impl JobProcess {
    /// `fedrun job <argv>`, with the credentials in the environment when `credentials`.
    fn spawn(argv: &[String], credentials: bool) -> JobProcess {
        JobProcess::spawn_with_env(argv, credentials, &[])
    }

    /// [`JobProcess::spawn`] with more environment variables.
    fn spawn_with_env(argv: &[String], credentials: bool, env: &[(&str, &str)]) -> JobProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fedrun"));
        command.envs(env.iter().copied());
        command
            .arg("job")
            .args(argv)
            .env("RUST_LOG", "info")
            .env_remove("NVFLARE_BACKBONE_CONN_GEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if credentials {
            command
                .env("NVFLARE_JOB_AUTH_TOKEN", TOKEN)
                .env("NVFLARE_JOB_TOKEN_SIGNATURE", TOKEN_SIGNATURE)
                .env("NVFLARE_JOB_SSID", SSID);
        } else {
            for var in fedrun_cli::cj::args::CREDENTIAL_VARS {
                command.env_remove(var);
            }
        }
        let mut child = command.spawn().expect("the fedrun binary starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::unbounded_channel();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&log);
        actix::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let mut text = sink.lock().unwrap_or_else(PoisonError::into_inner);
                text.push_str(&line);
                text.push('\n');
                drop(text);
                let _ = tx.send(line);
            }
        });
        JobProcess { child, lines, log }
    }

    fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits (at most [`DEADLINE`]) for a stderr line containing `needle`.
    async fn wait_for_line(&mut self, needle: &str) {
        let found = tokio::time::timeout(DEADLINE, async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(needle) {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            matches!(found, Ok(true)),
            "no line with {needle:?} from fedrun job ({}):\n{}",
            if found.is_err() {
                "timed out"
            } else {
                "it exited"
            },
            self.log()
        );
    }

    /// Waits (at most `deadline`) for the process to exit; returns its status and its whole
    /// stderr.
    async fn finish(&mut self, deadline: Duration) -> (ExitStatus, String) {
        let Ok(status) = tokio::time::timeout(deadline, self.child.wait()).await else {
            panic!(
                "fedrun job did not exit within {deadline:?}:\n{}",
                self.log()
            );
        };
        let status = status.unwrap();
        // the rest of stderr: the pipe closes with the process
        let _ = tokio::time::timeout(DEADLINE, async {
            while self.lines.recv().await.is_some() {}
        })
        .await;
        (status, self.log())
    }
}

impl Drop for JobProcess {
    fn drop(&mut self) {
        // kills by pid if still running (an exited child makes this a no-op)
        let _ = self.child.start_kill();
    }
}

/// Asserts a clean exit (status 0, no panic).
fn assert_exit_0(status: ExitStatus, log: &str) {
    assert_eq!(status.code(), Some(0), "fedrun job: {status}\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// The server's final model and the files of both sides are hello-numpy's expected ones.
fn assert_final_model(outcomes: &[WorkflowOutcome], server_ws: &Path, site_ws: &Path, job: &str) {
    let model = outcomes[0]
        .model
        .as_ref()
        .expect("ScatterAndGather's model");
    let global = &model["numpy_key"];
    assert_eq!(global.shape(), &[3, 3]);
    assert_eq!(global.to_f32_vec().unwrap(), expected_final_model());
    assert_eq!(outcomes[0].rounds.len(), 2);
    for round in &outcomes[0].rounds {
        assert_eq!(round.clients, [SITE]);
    }
    assert_eq!(&read_npy(&server_ws.join("models/server.npy")), global);
    let local = read_npy(&site_ws.join(job).join("model/best_numpy.npy"));
    assert_eq!(local.to_f32_vec().unwrap(), expected_final_model());
}

/// The server endpoint's peers during a run.
struct ServerPeers {
    job_cell: Fqcn,
    /// When the parent was told STARTED (the job's connections are up by then).
    at_started: Vec<Fqcn>,
    /// At each result the server received.
    at_results: Vec<Vec<Fqcn>>,
}

/// Runs hello-numpy with the job process in `kit`'s mode to its end; checks the exit, the
/// notifications and the model, and returns the server endpoint's peers during the run.
async fn run_to_completion(kit: Kit) -> ServerPeers {
    let dir = temp_dir(kit.scheme());
    let (server_ws, site_ws) = (dir.join("server"), dir.join(SITE));
    let job_id = format!("hello-{}", uuid::Uuid::new_v4());
    let job_cell = Fqcn::job_cell(SITE, &job_id).unwrap();
    let mut server = Server::start(&job_id, &server_ws).await;
    let relay_to = matches!(kit, Kit::Http).then_some(server.addr);
    let mut parent = FakeParent::start(relay_to).await;
    deploy(&site_ws, &job_id, server.addr, kit, None);
    let mut job = JobProcess::spawn(
        &worker_argv(&site_ws, &job_id, &parent.url(), server.addr, kit),
        true,
    );

    // The job tells its parent it started once its connections are up, before its first task.
    let started = parent.next_notice().await;
    assert_eq!(status_of(&started, &job_id), 2);
    let at_started = server.transport.peers();
    assert!(
        parent.transport.is_connected(&job_cell),
        "the job connected to its parent: {:?}",
        parent.transport.peers()
    );

    let view = server.outcome(|| job.log()).await;
    let (status, log) = job.finish(DEADLINE).await;
    assert_exit_0(status, &log);
    let mut notices = vec![started];
    notices.extend(parent.received());
    let statuses: Vec<i64> = notices.iter().map(|n| status_of(n, &job_id)).collect();
    assert_eq!(statuses, [2, 3], "{log}");
    assert!(log.contains("fedrun job exits with 0 (EndRun)"), "{log}");
    assert_final_model(&view.outcomes, &server_ws, &site_ws, &job_id);
    // NVFlare's job log file
    let file_log = std::fs::read_to_string(site_ws.join(&job_id).join("log.txt")).unwrap();
    assert!(file_log.contains("fedrun job exits with 0"), "{file_log}");
    // one result per round
    assert_eq!(view.peers_at_results.len(), 2);

    parent.stop().await;
    server.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
    ServerPeers {
        job_cell,
        at_started,
        at_results: view.peers_at_results,
    }
}

#[actix::test]
async fn a_run_completes_with_exit_0_started_then_stopped_and_the_expected_model() {
    let peers = run_to_completion(Kit::ClearTcp).await;
    // on a clear tcp kit the job has its own connection to the server
    for seen in &peers.at_results {
        assert_eq!(seen, std::slice::from_ref(&peers.job_cell));
    }
}

#[actix::test]
async fn on_an_http_kit_the_job_reaches_the_server_only_through_its_relaying_parent() {
    let peers = run_to_completion(Kit::Http).await;
    // the server's only peer is the CP endpoint: every message of the job was relayed
    let parent_only = [Fqcn::new(SITE).unwrap()];
    assert_eq!(peers.at_started, parent_only);
    for seen in &peers.at_results {
        assert_eq!(seen, &parent_only, "{} never a peer", peers.job_cell);
    }
}

#[actix::test]
async fn parent_commands_are_answered_while_a_task_runs_and_abort_ends_the_process_with_0() {
    let dir = temp_dir("commands");
    let (server_ws, site_ws) = (dir.join("server"), dir.join(SITE));
    let job_id = format!("cmds-{}", uuid::Uuid::new_v4());
    let server = Server::start(&job_id, &server_ws).await;
    let mut parent = FakeParent::start(None).await;
    deploy(&site_ws, &job_id, server.addr, Kit::ClearTcp, Some(30.0));
    let mut job = JobProcess::spawn(
        &worker_argv(&site_ws, &job_id, &parent.url(), server.addr, Kit::ClearTcp),
        true,
    );
    assert_eq!(status_of(&parent.next_notice().await, &job_id), 2);
    // NPTrainer now sleeps 30 s in its task
    job.wait_for_line("executing task train").await;

    let ok = CellCode::from(CellReturnCode::Ok);
    let reply = parent.command(&job_id, "check_status").await;
    assert_eq!(reply.return_code(), ok);
    assert_eq!(
        reply.payload.as_value().and_then(|v| v.as_str()),
        Some("started")
    );

    let reply = parent.command(&job_id, "show_stats").await;
    assert_eq!(reply.return_code(), ok);
    let stats = reply
        .payload
        .as_value()
        .expect("show_stats answers a value");
    assert!(
        stats.as_map().is_some() || stats.as_str() == Some("No stats info"),
        "{stats:?}"
    );

    let reply = parent.command(&job_id, "show_errors").await;
    assert_eq!(reply.return_code(), ok);
    assert_eq!(
        reply.payload.as_value().and_then(|v| v.as_str()),
        Some("No Errors")
    );

    let reply = parent.command(&job_id, "reset_errors").await;
    assert_eq!(reply.return_code(), ok);
    assert!(reply.payload.is_none(), "{:?}", reply.payload);

    let reply = parent.command(&job_id, "no_such_command").await;
    assert_eq!(
        reply.return_code(),
        CellCode::from(CellReturnCode::InvalidRequest)
    );

    // abort: the process ends by itself, long before the task's 30 s are over
    let reply = parent.command(&job_id, "abort").await;
    assert_eq!(reply.return_code(), ok);
    let (status, log) = job.finish(ABORT_EXIT_DEADLINE).await;
    assert_exit_0(status, &log);
    assert!(log.contains("fedrun job exits with 0 (Aborted)"), "{log}");
    let statuses: Vec<i64> = parent
        .received()
        .iter()
        .map(|n| status_of(n, &job_id))
        .collect();
    assert_eq!(statuses, [3], "after STARTED, only STOPPED\n{log}");

    parent.stop().await;
    server.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `fedrun job <argv>` with no parent or server anywhere: it must end by itself.
async fn run_bad(argv: &[String], credentials: bool) -> (ExitStatus, String) {
    let mut job = JobProcess::spawn(argv, credentials);
    let (status, log) = job.finish(DEADLINE).await;
    assert!(!log.contains("panicked"), "{log}");
    (status, log)
}

#[actix::test]
async fn bad_command_lines_exit_non_zero_with_a_message_and_no_panic() {
    let ws = temp_dir("bad");
    // nothing listens on port 9: none of these may get as far as connecting
    let nowhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let good = worker_argv(&ws, "J", "tcp://127.0.0.1:9", nowhere, Kit::ClearTcp);

    let mut unknown = good.clone();
    unknown.extend(["--bogus".to_owned(), "1".to_owned()]);
    let (status, log) = run_bad(&unknown, true).await;
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("fedrun job: error: unknown option \"--bogus\""),
        "{log}"
    );

    let i = good.iter().position(|a| a == "-n").unwrap();
    let mut no_job_id = good.clone();
    no_job_id.drain(i..i + 2);
    let (status, log) = run_bad(&no_job_id, true).await;
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("fedrun job: error: missing -n/--job_id"),
        "{log}"
    );

    let (status, log) = run_bad(&good, false).await;
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("fedrun job: error: missing the auth token (NVFLARE_JOB_AUTH_TOKEN"),
        "{log}"
    );

    let i = good.iter().position(|a| a == "--parent_conn_sec").unwrap();
    let mut mtls_parent = good.clone();
    mtls_parent[i + 1] = "mtls".to_owned();
    let (status, log) = run_bad(&mtls_parent, true).await;
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(
            "the parent connection tcp://127.0.0.1:9 (security \"mtls\") is not clear TCP"
        ),
        "{log}"
    );

    let i = good.iter().position(|a| a == "-p").unwrap();
    let mut grpc_parent = good.clone();
    grpc_parent[i + 1] = "grpc://127.0.0.1:9".to_owned();
    let (status, log) = run_bad(&grpc_parent, true).await;
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(
            "the parent connection grpc://127.0.0.1:9 (security \"clear\") is not clear TCP"
        ),
        "{log}"
    );

    match std::fs::remove_dir_all(&ws) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{e}"),
        _ => {}
    }
}

#[actix::test]
async fn a_parent_that_never_listens_fails_the_job_after_the_connect_timeout() {
    let ws = temp_dir("noparent");
    let job_id = "J";
    // nothing listens on port 9: neither the parent nor the server is there
    let nowhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
    deploy(&ws, job_id, nowhere, Kit::ClearTcp, None);
    let argv = worker_argv(&ws, job_id, "tcp://127.0.0.1:9", nowhere, Kit::ClearTcp);
    let mut job =
        JobProcess::spawn_with_env(&argv, true, &[(fedrun_cli::cj::ENV_CONNECT_TIMEOUT, "1")]);
    let (status, log) = job.finish(DEADLINE).await;
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("timed out after 1 s waiting for the client parent at tcp://127.0.0.1:9"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");

    let mut bad = JobProcess::spawn_with_env(
        &argv,
        true,
        &[(fedrun_cli::cj::ENV_CONNECT_TIMEOUT, "soon")],
    );
    let (status, log) = bad.finish(DEADLINE).await;
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("FEDRUN_JOB_CONNECT_TIMEOUT"), "{log}");
    std::fs::remove_dir_all(&ws).unwrap();
}
