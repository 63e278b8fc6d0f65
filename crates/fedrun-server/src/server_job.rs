//! The server job: NVFlare's server job process (`SJ`) for one job, as actors on a cell.
//!
//! [`ServerJob::builder`] starts what the server side of a job needs: the job's cell
//! `server.<job>`; an `SJ` [`RunInfo`] and [`AuxRunner`] (identity `server`, the job clients
//! loaded); the [`TaskManager`] that owns the task queue; and the handlers that connect them —
//! cell handlers for `server_command/get_task` and `server_command/submit_update`, aux handlers
//! for `__sync_runner__`, `__job_heartbeat__` and `__task_check__`. Workflows then run on it
//! ([`ServerJob::run_workflow`]); when they are done the run ends: every client job is told
//! `__end_run__` (aux, fire-and-forget to each `<site>.<job>`) and later `get_task` requests
//! are answered `__end_run__`. A run that failed (a workflow error, an abort) first tells every
//! client job so ([`RUN_FAILED_TOPIC`]), so that a client process can exit with an error.
//!
//! Client jobs that lose their connection: whoever owns the transport reports connections
//! closing and coming back ([`ServerJob::client_connection`], or
//! [`ServerJob::follow_connections`] on a watch of the transport's peers); a client job gone
//! for longer than the client grace ([`ServerJobBuilder::client_grace`], default
//! [`DEFAULT_CLIENT_GRACE`]) is counted out of the tasks waiting for it at once — the
//! workflow sees a failed client and goes on with the others or fails — instead of being
//! waited for until a timeout.
//!
//! Client-to-client aux messages need no relay here: in-process, client jobs reach each other
//! directly through the [`Network`]. A relay through the server is only needed once clients
//! connect over TCP (a later issue); it is not built.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr, WeakAddr};
use fedrun_cell::{
    header, request_handler, AbortSignal, Cell, CellHandle, CellMessage, Fqcn, HandlerError,
    Network, Transport,
};
use fedrun_core::constants::{
    channel, fl_ctx_key, header_key, process_type, reserved_topic, topic,
};
use fedrun_core::{AppReturnCode, Map, Shareable, Value};
use fedrun_engine::stream::StreamConfig;
use fedrun_engine::{
    aux_handler, AuxConfig, AuxRequest, AuxRunner, AuxTargets, GetAbortSignal, GetJobClients,
    NewContext, RegisterAuxMessageHandler, RunInfo, RunInfoConfig, SendAuxRequest, StreamProcessor,
};
use futures::FutureExt;
use tokio::sync::mpsc;

use crate::controller::Controller;
use crate::error::ServerError;
pub use crate::task_manager::DEFAULT_CLIENT_GRACE;
use crate::task_manager::{
    CheckTask, ClientConnection, EndRun, GetLastSeen, GetRunPhase, GetTask, Heartbeat, RunPhase,
    StartRun, StopTaskManager, SubmitUpdate, TaskManager, TaskManagerConfig,
};
use crate::workflow::{Workflow, WorkflowEvent, WorkflowOutcome};

/// The server's identity (`__identity_name__`) and the root of its job cell.
pub const SERVER_IDENTITY: &str = "server";

/// The default `__wait_time__` of `get_task` replies. NVFlare uses a few seconds; fedrun
/// polls faster because in-process polling is cheap.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The aux topic on which a server job tells its client jobs, before `__end_run__`, that the
/// run failed or was aborted (header [`RUN_FAILED_REASON`]: why). NVFlare has no such message
/// (its client jobs end the same way either way); fedrun's `fedrun client` listens to it to
/// exit with an error. A client job without a handler answers it with an error, which is only
/// logged.
pub const RUN_FAILED_TOPIC: &str = "fedrun.run_failed";
/// The header of a [`RUN_FAILED_TOPIC`] message that says why the run failed.
pub const RUN_FAILED_REASON: &str = "fedrun.reason";
/// How long the server job waits for the client jobs' answers to [`RUN_FAILED_TOPIC`].
const RUN_FAILED_NOTICE_TIMEOUT: Duration = Duration::from_secs(5);

/// Configuration of a server job before it starts.
///
/// # Example
/// ```
/// use std::time::Duration;
/// use fedrun_cell::Network;
/// use fedrun_server::{RunPhase, ServerJob};
///
/// actix::System::new().block_on(async {
///     let network = Network::new();
///     let server = ServerJob::builder("job-1")
///         .job_clients(&["site-1", "site-2"])
///         .poll_interval(Duration::from_millis(20))
///         .start(&network)
///         .await
///         .unwrap();
///     assert_eq!(server.cell().fqcn().as_str(), "server.job-1");
///     assert_eq!(server.job_clients(), ["site-1", "site-2"]);
///     assert_eq!(server.run_phase().await.unwrap(), RunPhase::NotStarted);
///     server.stop().await;
/// });
/// ```
#[derive(Debug)]
pub struct ServerJobBuilder {
    job_id: String,
    job_meta: Option<Value>,
    poll_interval: Duration,
    min_get_task_timeout: Option<Duration>,
    events: Option<mpsc::UnboundedSender<WorkflowEvent>>,
    check_run_mismatch: bool,
    client_grace: Duration,
}

impl ServerJobBuilder {
    /// The job meta (its `job_clients` list is required).
    pub fn job_meta(mut self, meta: Value) -> Self {
        self.job_meta = Some(meta);
        self
    }

    /// Shorthand for a job meta whose `job_clients` are plain sites with these names.
    pub fn job_clients(self, names: &[&str]) -> Self {
        let clients: Vec<Value> = names
            .iter()
            .map(|n| Value::Map([("name", Value::from(*n))].into_iter().collect()))
            .collect();
        let meta: Map = [("job_clients", Value::Array(clients))]
            .into_iter()
            .collect();
        self.job_meta(Value::Map(meta))
    }

    /// `__wait_time__` of the replies: how long clients wait before polling again (default
    /// [`DEFAULT_POLL_INTERVAL`]).
    pub fn poll_interval(mut self, wait: Duration) -> Self {
        self.poll_interval = wait;
        self
    }

    /// `min_get_task_timeout`, sent with every task and try-again reply (default: not sent).
    pub fn min_get_task_timeout(mut self, timeout: Duration) -> Self {
        self.min_get_task_timeout = Some(timeout);
        self
    }

    /// Where workflows publish their progress (rounds started and completed, results
    /// received).
    pub fn events(mut self, tx: mpsc::UnboundedSender<WorkflowEvent>) -> Self {
        self.events = Some(tx);
        self
    }

    /// How long a client job whose connection closed may take to come back before it is
    /// counted out of the tasks waiting for it (default [`DEFAULT_CLIENT_GRACE`]; see
    /// [`ServerJob::client_connection`]).
    pub fn client_grace(mut self, grace: Duration) -> Self {
        self.client_grace = grace;
        self
    }

    /// Answer aux requests whose peer's `__run_num__` is not this job with `RUN_MISMATCH`
    /// (default on: a server job only talks to its own client jobs).
    pub fn check_run_mismatch(mut self, on: bool) -> Self {
        self.check_run_mismatch = on;
        self
    }

    /// Starts the server job on the in-process `network`: its cell is `server.<job_id>`.
    ///
    /// # Errors
    ///
    /// As [`ServerJobBuilder::start_on`].
    pub async fn start(self, network: &Network) -> Result<ServerJob, ServerError> {
        self.start_on(network.clone()).await
    }

    /// Starts the server job on any cell transport.
    ///
    /// # Errors
    ///
    /// [`ServerError::Config`] without job clients; [`ServerError::Cell`] for a job id that is
    /// not a valid cell-name part or a cell name already taken; [`ServerError::Engine`] for an
    /// invalid job meta; [`ServerError::ActorGone`].
    pub async fn start_on<T: Transport>(self, transport: T) -> Result<ServerJob, ServerError> {
        let job_id = self.job_id.clone();
        let Some(meta) = self.job_meta.clone() else {
            return Err(ServerError::Config(
                "the server job needs its job clients (job_clients or job_meta)".to_owned(),
            ));
        };
        let fqcn = Fqcn::job_cell(SERVER_IDENTITY, &job_id)?;
        let cell = Cell::start(fqcn.clone(), transport)?;
        match self.wire(cell.clone(), meta).await {
            Ok(job) => {
                log::info!(
                    "[job={job_id} site=server] server job started on cell {fqcn} for {} client(s)",
                    job.clients.len()
                );
                Ok(job)
            }
            Err(e) => {
                log::error!("[job={job_id} site=server] server job not started: {e}");
                cell.stop().await;
                Err(e)
            }
        }
    }

    async fn wire(self, cell: CellHandle, meta: Value) -> Result<ServerJob, ServerError> {
        let job_id = self.job_id;
        // A client job may send its results' arrays as NVFlare download references (NVFlare's
        // default): they are pulled from the client before the task manager sees the result.
        let resolver = fedrun_engine::download::ArrayResolver::new(
            cell.clone(),
            SERVER_IDENTITY,
            &job_id,
            fedrun_engine::download::DownloadConfig::default(),
        );
        cell.set_payload_resolver(Some(std::sync::Arc::new(resolver)))
            .await?;
        let run_info = RunInfo::new(
            RunInfoConfig::new(SERVER_IDENTITY, &job_id)
                .with_job_meta(meta)
                .with_process_type(process_type::SERVER_JOB),
        )
        .start();
        let aux = AuxRunner::new(
            AuxConfig::new(SERVER_IDENTITY, &job_id, cell.clone(), run_info.clone())
                .with_process_type(process_type::SERVER_JOB)
                .with_check_run_mismatch(self.check_run_mismatch),
        )
        .start();
        let clients: Vec<String> = aux
            .send(GetJobClients { job_meta: None })
            .await
            .map_err(ServerError::gone("AuxRunner"))??
            .into_iter()
            .map(|c| c.name)
            .collect();
        let server_ctx = run_info
            .send(NewContext)
            .await
            .map_err(ServerError::gone("RunInfo"))?
            .to_peer_context();
        let run_abort = run_info
            .send(GetAbortSignal)
            .await
            .map_err(ServerError::gone("RunInfo"))?;
        let config = TaskManagerConfig::new(&job_id, clients.clone(), server_ctx)
            .with_poll_interval(self.poll_interval)
            .with_min_get_task_timeout(self.min_get_task_timeout)
            .with_client_grace(self.client_grace);
        let tasks = TaskManager::new(config).start();
        register_cell_handlers(&cell, tasks.downgrade()).await?;
        register_aux_handlers(&aux, tasks.downgrade()).await?;
        let stream = StreamProcessor::start(StreamConfig::new(
            SERVER_IDENTITY,
            &job_id,
            aux.clone(),
            run_info.clone(),
        ))
        .await?;
        Ok(ServerJob {
            stream,
            job_id: Arc::from(job_id.as_str()),
            clients: clients.into(),
            cell,
            run_info,
            aux,
            tasks,
            run_abort,
            events: self.events,
        })
    }
}

async fn register_cell_handlers(
    cell: &CellHandle,
    tasks: WeakAddr<TaskManager>,
) -> Result<(), ServerError> {
    let weak = tasks.clone();
    let get_task = request_handler(move |msg: CellMessage| {
        let tasks = weak.upgrade();
        async move {
            let tasks = tasks.ok_or(HandlerError::ServiceUnavailable)?;
            let reply = tasks
                .send(GetTask {
                    request: msg.payload,
                })
                .await
                .map_err(|_| HandlerError::ServiceUnavailable)?;
            let root_id = reply.header_or_none(header_key::MSG_ROOT_ID).cloned();
            let root_ttl = reply.header_or_none(header_key::MSG_ROOT_TTL).cloned();
            let mut out = CellMessage::new(reply);
            if let Some(id) = root_id {
                out.headers.insert(header::MSG_ROOT_ID, id);
            }
            if let Some(ttl) = root_ttl {
                out.headers.insert(header::MSG_ROOT_TTL, ttl);
            }
            Ok(Some(out))
        }
    });
    cell.register_request_handler(channel::SERVER_COMMAND, topic::GET_TASK, get_task)
        .await?;
    let submit = request_handler(move |msg: CellMessage| {
        let tasks = tasks.upgrade();
        async move {
            let tasks = tasks.ok_or(HandlerError::ServiceUnavailable)?;
            tasks
                .send(SubmitUpdate {
                    result: msg.payload,
                })
                .await
                .map_err(|_| HandlerError::ServiceUnavailable)?;
            Ok(Some(CellMessage::new(Shareable::new())))
        }
    });
    cell.register_request_handler(channel::SERVER_COMMAND, topic::SUBMIT_UPDATE, submit)
        .await?;
    Ok(())
}

/// The requesting client's name, from the aux request's peer props.
fn aux_client(req: &AuxRequest) -> String {
    req.request
        .peer_prop(fl_ctx_key::IDENTITY_NAME)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

async fn register_aux_handlers(
    aux: &Addr<AuxRunner>,
    tasks: WeakAddr<TaskManager>,
) -> Result<(), ServerError> {
    let weak = tasks.clone();
    let sync = aux_handler(move |_req: AuxRequest| {
        let tasks = weak.upgrade();
        async move {
            let tasks = tasks.ok_or_else(|| "the task manager is gone".to_owned())?;
            let phase = tasks
                .send(GetRunPhase)
                .await
                .map_err(|e| format!("the task manager is gone: {e}"))?;
            let rc = match phase {
                RunPhase::NotStarted => AppReturnCode::ServerNotReady,
                RunPhase::Running | RunPhase::Ended => AppReturnCode::Ok,
            };
            Ok(Shareable::make_reply(rc, None))
        }
    });
    let weak = tasks.clone();
    let heartbeat = aux_handler(move |req: AuxRequest| {
        let tasks = weak.upgrade();
        async move {
            let tasks = tasks.ok_or_else(|| "the task manager is gone".to_owned())?;
            tasks
                .send(Heartbeat {
                    client: aux_client(&req),
                })
                .await
                .map_err(|e| format!("the task manager is gone: {e}"))?;
            Ok(Shareable::make_reply(AppReturnCode::Ok, None))
        }
    });
    let check = aux_handler(move |req: AuxRequest| {
        let tasks = tasks.upgrade();
        async move {
            let tasks = tasks.ok_or_else(|| "the task manager is gone".to_owned())?;
            let task_id = req
                .request
                .header_or_none(header_key::TASK_ID)
                .and_then(Value::as_str)
                .map(str::to_owned);
            let rc = tasks
                .send(CheckTask {
                    client: aux_client(&req),
                    task_id,
                })
                .await
                .map_err(|e| format!("the task manager is gone: {e}"))?;
            Ok(Shareable::make_reply(rc, None))
        }
    });
    for (topic, handler) in [
        (reserved_topic::SYNC_RUNNER, sync),
        (reserved_topic::JOB_HEARTBEAT, heartbeat),
        (reserved_topic::TASK_CHECK, check),
    ] {
        aux.send(RegisterAuxMessageHandler::new(topic, handler))
            .await
            .map_err(ServerError::gone("AuxRunner"))??;
    }
    Ok(())
}

/// A running server job (see the module doc). Cheap to clone: every clone drives the same
/// job.
///
/// # Example
/// ```
/// use fedrun_cell::Network;
/// use fedrun_server::{RunPhase, ServerJob};
///
/// actix::System::new().block_on(async {
///     let network = Network::new();
///     let server = ServerJob::builder("job-1").job_clients(&["site-1"]).start(&network).await.unwrap();
///     server.end_run().await.unwrap();
///     assert_eq!(server.run_phase().await.unwrap(), RunPhase::Ended);
/// });
/// ```
#[derive(Clone)]
pub struct ServerJob {
    job_id: Arc<str>,
    clients: Arc<[String]>,
    cell: CellHandle,
    run_info: Addr<RunInfo>,
    aux: Addr<AuxRunner>,
    tasks: Addr<TaskManager>,
    stream: Addr<StreamProcessor>,
    run_abort: AbortSignal,
    events: Option<mpsc::UnboundedSender<WorkflowEvent>>,
}

impl std::fmt::Debug for ServerJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerJob")
            .field("job_id", &self.job_id)
            .field("clients", &self.clients)
            .finish_non_exhaustive()
    }
}

impl ServerJob {
    /// A builder for the server job of `job_id`.
    pub fn builder(job_id: &str) -> ServerJobBuilder {
        ServerJobBuilder {
            job_id: job_id.to_owned(),
            job_meta: None,
            poll_interval: DEFAULT_POLL_INTERVAL,
            min_get_task_timeout: None,
            events: None,
            check_run_mismatch: true,
            client_grace: DEFAULT_CLIENT_GRACE,
        }
    }

    /// The job id.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The job's clients, in job-meta order.
    pub fn job_clients(&self) -> &[String] {
        &self.clients
    }

    /// The job's cell (`server.<job>`).
    pub fn cell(&self) -> &CellHandle {
        &self.cell
    }

    /// The `SJ` aux runner (e.g. to register more aux handlers or send aux requests).
    pub fn aux_runner(&self) -> &Addr<AuxRunner> {
        &self.aux
    }

    /// The run-info actor (contexts, error log, the run's abort signal).
    pub fn run_info(&self) -> &Addr<RunInfo> {
        &self.run_info
    }

    /// The task manager.
    pub fn task_manager(&self) -> &Addr<TaskManager> {
        &self.tasks
    }

    /// A controller for the workflow `workflow` (its id, sent as the `__workflow__` cookie).
    pub fn controller(&self, workflow: &str) -> Controller {
        Controller::new(
            Arc::clone(&self.job_id),
            workflow,
            Arc::clone(&self.clients),
            self.tasks.clone(),
            self.run_abort.clone(),
            self.events.clone(),
            Some(self.stream.clone()),
        )
    }

    /// The server job's object streamer (`StreamProcessor`), which carries large models.
    pub fn stream_processor(&self) -> &Addr<StreamProcessor> {
        &self.stream
    }

    /// The run's phase.
    ///
    /// # Errors
    ///
    /// [`ServerError::ActorGone`] once stopped.
    pub async fn run_phase(&self) -> Result<RunPhase, ServerError> {
        self.tasks
            .send(GetRunPhase)
            .await
            .map_err(ServerError::gone("TaskManager"))
    }

    /// When each client was last heard of (`get_task`, `submit_update`, `__task_check__`,
    /// `__job_heartbeat__`), by name; clients never heard of are absent.
    ///
    /// # Errors
    ///
    /// [`ServerError::ActorGone`] once stopped.
    pub async fn last_seen(&self) -> Result<HashMap<String, Instant>, ServerError> {
        self.tasks
            .send(GetLastSeen)
            .await
            .map_err(ServerError::gone("TaskManager"))
    }

    /// Reports that the connection of `client`'s job closed (`connected == false`) or is (back)
    /// up. A client job that does not come back within the client grace is counted out of the
    /// tasks waiting for it (they get a `COMMUNICATION_ERROR` result in its name, logged with
    /// the site and job), and of the tasks posted for it until it connects again. Unknown names
    /// are ignored.
    pub fn client_connection(&self, client: &str, connected: bool) {
        // do_send: a report must not wait; the mailbox is bounded by the number of changes.
        self.tasks.do_send(ClientConnection {
            client: client.to_owned(),
            connected,
        });
    }

    /// Follows the connections of the job's clients: after every change signalled by
    /// `changes` (e.g. a network transport's watch of its peers), `is_connected(site)` is
    /// asked for every job client and each change is reported with
    /// [`ServerJob::client_connection`]. Clients start as not connected, and a client is only
    /// reported gone after it was seen connected (a client that has not connected yet is
    /// waited for). The returned task ends when `changes`' sender is dropped.
    ///
    /// # Example
    /// With a TCP transport: `server.follow_connections(transport.peer_changes(), move |site|
    /// t.is_connected(&Fqcn::job_cell(site, &job).unwrap()))`. By hand:
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use fedrun_cell::Network;
    /// use fedrun_server::ServerJob;
    ///
    /// actix::System::new().block_on(async {
    ///     let server = ServerJob::builder("job-1").job_clients(&["site-1"])
    ///         .start(&Network::new()).await.unwrap();
    ///     let (changed, changes) = tokio::sync::watch::channel(0u64);
    ///     let up = Arc::new(Mutex::new(true));
    ///     let seen = Arc::clone(&up);
    ///     let follower = server.follow_connections(changes, move |_site| *seen.lock().unwrap());
    ///     *up.lock().unwrap() = false; // site-1's connection closed
    ///     changed.send_modify(|g| *g += 1);
    ///     drop(changed);
    ///     follower.await.unwrap();
    ///     server.stop().await;
    /// });
    /// ```
    pub fn follow_connections(
        &self,
        mut changes: tokio::sync::watch::Receiver<u64>,
        is_connected: impl Fn(&str) -> bool + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let server = self.clone();
        actix::spawn(async move {
            let mut up: HashMap<String, bool> = HashMap::new();
            loop {
                changes.borrow_and_update();
                for site in server.clients.iter() {
                    let now = is_connected(site);
                    let before = up.insert(site.clone(), now).unwrap_or(false);
                    if now != before {
                        server.client_connection(site, now);
                    }
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    /// Aborts the run: every wait of every workflow ends with [`ServerError::Aborted`] (the
    /// workflow then fails and [`ServerJob::run_workflow`] ends the run).
    pub fn abort(&self) {
        log::info!("[job={} site=server] run abort requested", self.job_id);
        self.run_abort.trigger();
    }

    /// Runs `workflow` to its end, then ends the run (see [`ServerJob::run_workflows`]).
    ///
    /// # Errors
    ///
    /// The workflow's error ([`ServerError::WorkflowPanicked`] when it panicked), else an
    /// error ending the run.
    pub async fn run_workflow<W: Workflow + ?Sized>(
        &self,
        workflow: &mut W,
    ) -> Result<WorkflowOutcome, ServerError> {
        let outcome = self.run_one(workflow).await;
        if let Err(e) = &outcome {
            self.tell_run_failed(e).await;
        }
        let ended = self.end_run().await;
        let outcome = outcome?;
        ended?;
        Ok(outcome)
    }

    /// Runs `workflows` one after the other (the order of the job config), stopping at the
    /// first failure, then ends the run in every case: clients are told `__end_run__` and later
    /// `get_task` requests are answered `__end_run__`. The server stays up (so that clients
    /// can still be told the run ended) until [`ServerJob::stop`].
    ///
    /// # Errors
    ///
    /// The first workflow error, else an error ending the run.
    pub async fn run_workflows(
        &self,
        workflows: &mut [Box<dyn Workflow>],
    ) -> Result<Vec<WorkflowOutcome>, ServerError> {
        let mut outcomes = Vec::with_capacity(workflows.len());
        let mut failure = None;
        for workflow in workflows.iter_mut() {
            match self.run_one(workflow.as_mut()).await {
                Ok(o) => outcomes.push(o),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = &failure {
            self.tell_run_failed(e).await;
        }
        let ended = self.end_run().await;
        if let Some(e) = failure {
            return Err(e);
        }
        ended?;
        Ok(outcomes)
    }

    /// Runs one workflow (the run stays open), catching its panics.
    async fn run_one<W: Workflow + ?Sized>(
        &self,
        workflow: &mut W,
    ) -> Result<WorkflowOutcome, ServerError> {
        let name = workflow.name().to_owned();
        self.tasks
            .send(StartRun)
            .await
            .map_err(ServerError::gone("TaskManager"))?;
        let ctl = self.controller(&name);
        ctl.emit(WorkflowEvent::WorkflowStarted {
            workflow: name.clone(),
        });
        log::info!("[job={} site=server] workflow {name} started", self.job_id);
        let result = match std::panic::catch_unwind(AssertUnwindSafe(move || workflow.run(ctl))) {
            Ok(fut) => AssertUnwindSafe(fut)
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| Err(panicked(&name, panic.as_ref()))),
            Err(panic) => Err(panicked(&name, panic.as_ref())),
        };
        match &result {
            Ok(_) => log::info!("[job={} site=server] workflow {name} done", self.job_id),
            Err(e) => log::error!(
                "[job={} site=server] workflow {name} failed: {e}",
                self.job_id
            ),
        }
        if let Some(tx) = &self.events {
            // An observer that went away is not the workflow's problem.
            let _ = tx.send(WorkflowEvent::WorkflowFinished {
                workflow: name,
                error: result.as_ref().err().map(ToString::to_string),
            });
        }
        result
    }

    /// Tells every client job that the run failed ([`RUN_FAILED_TOPIC`]), unless the run had
    /// ended already; waits for their answers a few seconds at most. Failures are logged only:
    /// the run ends anyway.
    async fn tell_run_failed(&self, error: &ServerError) {
        if matches!(self.run_phase().await, Ok(RunPhase::Ended) | Err(_)) {
            return;
        }
        let mut notice = Shareable::new();
        notice.set_header(RUN_FAILED_REASON, error.to_string());
        let request = SendAuxRequest::new(
            AuxTargets::Sites(self.clients.to_vec()),
            RUN_FAILED_TOPIC,
            notice,
            RUN_FAILED_NOTICE_TIMEOUT,
        )
        .with_optional(true);
        match self.aux.send(request).await {
            Ok(Ok(replies)) => {
                for (site, reply) in replies {
                    let rc = reply.return_code();
                    if !rc.is_ok() {
                        log::info!(
                            "[job={} site={site}] the notice that the run failed was answered \
                             {rc}",
                            self.job_id
                        );
                    }
                }
                log::info!(
                    "[job={} site=server] client jobs told that the run failed: {error}",
                    self.job_id
                );
            }
            Ok(Err(e)) => log::warn!(
                "[job={} site=server] the notice that the run failed was not sent: {e}",
                self.job_id
            ),
            Err(e) => log::warn!(
                "[job={} site=server] the notice that the run failed was not sent: {e}",
                self.job_id
            ),
        }
    }

    /// Ends the run (idempotent): open tasks are closed, later `get_task` requests are answered
    /// `__end_run__`, and every client job gets an `__end_run__` aux message (fire-and-forget;
    /// a client job that is already gone is skipped, logged at debug level).
    ///
    /// # Errors
    ///
    /// [`ServerError::ActorGone`], [`ServerError::Engine`] when the aux runner cannot send.
    pub async fn end_run(&self) -> Result<(), ServerError> {
        let changed = self
            .tasks
            .send(EndRun)
            .await
            .map_err(ServerError::gone("TaskManager"))?;
        if !changed {
            return Ok(());
        }
        let targets = AuxTargets::Sites(self.clients.to_vec());
        let notice = SendAuxRequest::new(
            targets,
            reserved_topic::END_RUN,
            Shareable::new(),
            Duration::ZERO,
        )
        .with_optional(true);
        self.aux
            .send(notice)
            .await
            .map_err(ServerError::gone("AuxRunner"))??;
        log::info!(
            "[job={} site=server] end of run sent to {} client job(s)",
            self.job_id,
            self.clients.len()
        );
        Ok(())
    }

    /// Ends the run if needed, then stops the task manager and the cell (the server job becomes
    /// unreachable; the other actors stop with the last handle).
    pub async fn stop(&self) {
        if let Err(e) = self.end_run().await {
            log::debug!(
                "[job={} site=server] stop: end of run not sent: {e}",
                self.job_id
            );
        }
        if self.tasks.send(StopTaskManager).await.is_err() {
            log::debug!(
                "[job={} site=server] stop: task manager already gone",
                self.job_id
            );
        }
        self.cell.stop().await;
        log::info!("[job={} site=server] server job stopped", self.job_id);
    }
}

fn panicked(workflow: &str, panic: &(dyn std::any::Any + Send)) -> ServerError {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".to_owned());
    ServerError::WorkflowPanicked {
        workflow: workflow.to_owned(),
        message,
    }
}
